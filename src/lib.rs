//! zagreus: run the Zagreus family of small Italian/English language models.
//!
//! The flow of one request: [`source`] resolves `--model` to files, [`loader`] builds the
//! [`model`] with its [`tokenizer`] and chat [`template`], a front end ([`oneshot`]) builds the
//! prompt, and a [`session::Session`] generates with a [`sampling::Sampler`], streaming text.

pub mod batch;
pub mod bench;
pub mod bounded;
pub mod budget;
pub mod chat;
pub mod cli;
pub mod commands;
pub mod device;
pub mod generation;
pub mod hub;
pub mod interrupt;
pub mod loader;
pub mod model;
pub mod oneshot;
pub mod openai;
pub mod output;
pub mod perplexity;
pub mod repl;
pub mod sampling;
pub mod scheduler;
pub mod server;
pub mod session;
pub mod settings;
pub mod source;
pub mod structured;
pub mod template;
pub mod tokenizer;
pub mod tools;
