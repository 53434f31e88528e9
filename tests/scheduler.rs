//! The continuous-batching scheduler: a sequence's tokens do not depend on what runs beside it,
//! the queue is bounded, a dropped request frees its sequence, a shared prefix is not run again,
//! and a request that can never fit is refused.

mod common;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{asset, model_dir};
use zagreus::generation::{Event, FinishReason, GenerateOptions};
use zagreus::loader::{load, load_gguf, LoadOptions, LoadedModel};
use zagreus::sampling::Sampler;
use zagreus::scheduler::{Request, Scheduler, SchedulerConfig, Update};
use zagreus::session::{generate, Session};
use zagreus::settings::{SamplingRequest, Settings};
use zagreus::source::ModelFiles;

fn fixture() -> Arc<LoadedModel> {
    let files = ModelFiles::from_dir(&model_dir("tied-bf16")).unwrap();
    Arc::new(load(&files, &LoadOptions::cpu()).unwrap())
}

fn smollm2() -> Arc<LoadedModel> {
    let path = asset("SmolLM2-135M-Instruct.Q4_1.gguf");
    Arc::new(load_gguf(&path, "smollm2", &LoadOptions::cpu()).unwrap())
}

fn settings(temperature: f64, seed: u64, max_tokens: usize) -> Settings {
    let req = SamplingRequest {
        temperature: Some(temperature),
        top_k: Some(0),
        seed: Some(seed),
        max_tokens: Some(max_tokens),
        ..Default::default()
    };
    Settings::resolve(&req, &Default::default()).unwrap()
}

fn request(prompt: Vec<u32>, settings: Settings) -> Request {
    Request {
        prompt,
        settings,
        logprobs: None,
        prompt_logprobs: None,
        constraint: None,
    }
}

/// The tokens a request gets with nothing else running: one session, the one-shot path.
fn alone(lm: &LoadedModel, req: &Request, context: usize) -> (Vec<u32>, FinishReason) {
    let mut session = Session::new(&lm.model, context);
    let mut sampler = Sampler::new(req.settings.sampling.clone());
    let opts = GenerateOptions {
        max_tokens: req.settings.max_tokens,
        stop_ids: lm.stop_ids.clone(),
        stop_strings: req.settings.stop.clone(),
        ignore_eos: req.settings.ignore_eos,
        logprobs: None,
        constraint: None,
    };
    let c = generate(
        &mut session,
        &lm.tokenizer,
        &mut sampler,
        &req.prompt,
        &opts,
        &AtomicBool::new(false),
        &mut |_| Ok(()),
    )
    .unwrap();
    (c.tokens, c.finish)
}

/// Prompts of different lengths, token ids spread over the vocabulary (no special tokens).
fn prompts(lm: &LoadedModel, lens: &[usize]) -> Vec<Vec<u32>> {
    let vocab = lm.tokenizer.vocab_size() as u64;
    let special = lm.stop_ids.iter().copied().max().unwrap_or(0) as u64 + 1;
    lens.iter()
        .enumerate()
        .map(|(i, &n)| {
            (0..n as u64)
                .map(|j| (special + (j * 7 + i as u64 * 13) * 2654435761 % (vocab - special)) as u32)
                .collect()
        })
        .collect()
}

fn same_tokens_alone_and_batched(lm: Arc<LoadedModel>, lens: &[usize], max_tokens: usize, context: usize) {
    let mut config = SchedulerConfig::new(&lm, 8, context);
    // Small prompt pieces: prefill steps interleave with the others' decoding.
    config.prefill_chunk = 7;
    let sched = Scheduler::start(lm.clone(), config);
    for (temperature, seed) in [(0.0, 1), (1.0, 42)] {
        let reqs: Vec<Request> = prompts(&lm, lens)
            .into_iter()
            .enumerate()
            .map(|(i, p)| request(p, settings(temperature, seed + i as u64, max_tokens)))
            .collect();
        let handles: Vec<_> = reqs.iter().map(|r| sched.submit(r.clone()).unwrap()).collect();
        for (r, h) in reqs.iter().zip(handles) {
            let c = h.wait().unwrap();
            let (tokens, finish) = alone(&lm, r, context);
            assert_eq!(
                c.tokens,
                tokens,
                "temperature {temperature}: prompt of {}",
                r.prompt.len()
            );
            assert_eq!(c.finish, finish);
        }
    }
    let counters = sched.counters();
    assert!(counters.widest_step >= 6, "sequences ran together: {counters:?}");
}

#[test]
fn a_sequence_gets_the_same_tokens_alone_or_among_seven_others() {
    same_tokens_alone_and_batched(fixture(), &[3, 17, 9, 30, 1, 12, 25, 6], 20, 64);
}

#[test]
fn the_real_smollm2_gets_the_same_tokens_alone_or_batched() {
    same_tokens_alone_and_batched(smollm2(), &[40, 5, 23, 61, 12, 33, 2, 48], 12, 512);
}

#[test]
fn the_queue_is_bounded() {
    let lm = fixture();
    let mut config = SchedulerConfig::new(&lm, 1, 64);
    config.max_queue = 2;
    let sched = Scheduler::start(lm.clone(), config);
    let p = prompts(&lm, &[4]).remove(0);
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..5 {
        match sched.submit(request(p.clone(), settings(0.0, 1, 40))) {
            Ok(h) => accepted.push(h),
            Err(e) => refused.push(e.to_string()),
        }
    }
    // One sequence and two places: three are accepted while none runs yet, two once one does.
    assert!((2..=3).contains(&accepted.len()), "{} accepted", accepted.len());
    assert!(refused.iter().all(|e| e.contains("queue is full")), "{refused:?}");
    for h in accepted {
        h.wait().unwrap();
    }
    // Room again once they are done.
    sched.submit(request(p, settings(0.0, 1, 2))).unwrap().wait().unwrap();
}

/// A request of SmolLM2 that holds its sequence until cancelled, once it has begun.
fn running_until_cancelled(sched: &Scheduler, lm: &LoadedModel) -> zagreus::scheduler::Handle {
    let p = prompts(lm, &[4]).remove(0);
    let mut long = settings(0.0, 1, 4000);
    long.ignore_eos = true;
    let h = sched.submit(request(p, long)).expect("a free sequence");
    match h.updates.recv_timeout(Duration::from_secs(30)).unwrap() {
        Update::Event(Event::Token { .. }) => h,
        other => panic!("{other:?}"),
    }
}

/// SmolLM2 with one sequence and room for `max_queue` waiting requests, a short prompt, and a
/// first request holding the sequence.
fn one_sequence_taken(max_queue: usize) -> (Scheduler, Vec<u32>, zagreus::scheduler::Handle) {
    let lm = smollm2();
    let mut config = SchedulerConfig::new(&lm, 1, 4096);
    config.max_queue = max_queue;
    let sched = Scheduler::start(lm.clone(), config);
    let a = running_until_cancelled(&sched, &lm);
    (sched, prompts(&lm, &[4]).remove(0), a)
}

#[test]
fn a_queue_of_zero_runs_a_request_at_once_or_refuses_it() {
    let (sched, p, a) = one_sequence_taken(0);
    let e = sched.submit(request(p.clone(), settings(0.0, 1, 3))).err().unwrap();
    assert!(e.to_string().contains("queue is full"), "{e}");
    a.cancel();
    assert_eq!(a.wait().unwrap().finish, FinishReason::Cancelled);
    // The sequence is free again by the time its client hears that it is done.
    sched.submit(request(p, settings(0.0, 1, 3))).unwrap().wait().unwrap();
}

#[test]
fn requests_cancelled_while_waiting_leave_their_place_in_the_queue() {
    let (sched, p, a) = one_sequence_taken(1);
    let b = sched.submit(request(p.clone(), settings(0.0, 1, 3))).unwrap();
    let e = sched.submit(request(p.clone(), settings(0.0, 1, 3))).err().unwrap();
    assert!(e.to_string().contains("queue is full"), "{e}");
    // B's client goes away: its place is free while A still runs.
    drop(b);
    assert_eq!(sched.queued(), 0);
    let d = sched.submit(request(p, settings(0.0, 1, 3))).unwrap();
    assert_eq!(sched.queued(), 1);
    a.cancel();
    let done = d.wait().unwrap();
    assert!(!done.tokens.is_empty() || done.finish == FinishReason::StopToken);
}

#[test]
fn a_dropped_request_frees_its_sequence() {
    // A model and context large enough that the first request is still running when dropped.
    let lm = smollm2();
    let sched = Scheduler::start(lm.clone(), SchedulerConfig::new(&lm, 1, 4096));
    let p = prompts(&lm, &[4]).remove(0);
    let mut long = settings(0.0, 1, 4000);
    long.ignore_eos = true;
    let a = sched.submit(request(p.clone(), long)).unwrap();
    // The second waits: there is one sequence, and it is taken.
    let b = sched.submit(request(p.clone(), settings(0.0, 1, 3))).unwrap();
    match a.updates.recv_timeout(Duration::from_secs(30)).unwrap() {
        Update::Event(Event::Token { .. }) => {}
        other => panic!("{other:?}"),
    }
    drop(a);
    let t = Instant::now();
    let c = b.wait().unwrap();
    assert!(!c.tokens.is_empty() || c.finish == FinishReason::StopToken);
    assert!(t.elapsed() < Duration::from_secs(30));
    // The counters are updated just after the last update is sent.
    let mut counters = sched.counters();
    while counters.active > 0 && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(5));
        counters = sched.counters();
    }
    assert_eq!(counters.cancelled, 1, "{counters:?}");
    assert_eq!(counters.active, 0, "{counters:?}");

    // Cancelling through the handle ends it with the text so far.
    let mut long = settings(0.0, 1, 4000);
    long.ignore_eos = true;
    let h = sched.submit(request(p, long)).unwrap();
    h.cancel();
    assert_eq!(h.wait().unwrap().finish, FinishReason::Cancelled);
}

#[test]
fn a_shared_prefix_is_not_run_again() {
    let lm = fixture();
    let sched = Scheduler::start(lm.clone(), SchedulerConfig::new(&lm, 2, 64));
    let ps = prompts(&lm, &[24, 6]);
    let system = &ps[0];
    let vocab = lm.tokenizer.vocab_size() as u32;
    let other: Vec<u32> = ps[1]
        .iter()
        .map(|&t| if t + 1 < vocab { t + 1 } else { t - 1 })
        .collect();
    let first: Vec<u32> = system.iter().chain(&ps[1][..4]).copied().collect();
    let second: Vec<u32> = system.iter().chain(&other).copied().collect();
    let a = sched
        .submit(request(first, settings(0.0, 1, 5)))
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(a.stats.prompt_processed, 28);
    let req = request(second.clone(), settings(0.0, 1, 5));
    let b = sched.submit(req.clone()).unwrap().wait().unwrap();
    assert_eq!(b.stats.prompt_tokens, 30);
    assert_eq!(b.stats.prompt_processed, 6, "only the tokens after the shared 24 run");
    assert_eq!(sched.counters().prompt_tokens_reused, 24);
    // And the answer is the one it gets from scratch.
    assert_eq!(b.tokens, alone(&lm, &req, 64).0);
}

#[test]
fn a_short_shared_prefix_is_copied_and_the_conversation_it_came_from_kept() {
    let lm = fixture();
    let sched = Scheduler::start(lm.clone(), SchedulerConfig::new(&lm, 2, 64));
    let ps = prompts(&lm, &[40, 3]);
    let mut four = settings(0.0, 1, 4);
    four.ignore_eos = true;
    // A conversation of 40 tokens and its 4-token answer: 43 positions cached when it ends.
    let a = sched
        .submit(request(ps[0].clone(), four.clone()))
        .unwrap()
        .wait()
        .unwrap();
    assert_eq!(a.tokens.len(), 4);
    // Another request shares its first 6 tokens only: they are copied, not taken.
    let vocab = lm.tokenizer.vocab_size() as u32;
    let differ = |&t: &u32| if t + 1 < vocab { t + 1 } else { t - 1 };
    let other: Vec<u32> = ps[0][..6]
        .iter()
        .copied()
        .chain(ps[0][6..12].iter().map(differ))
        .collect();
    let b_req = request(other, four.clone());
    let b = sched.submit(b_req.clone()).unwrap().wait().unwrap();
    assert_eq!(b.stats.prompt_processed, 6, "the shared 6 tokens are not run again");
    assert_eq!(b.tokens, alone(&lm, &b_req, 64).0);
    // The conversation's next turn still finds all of it.
    let next: Vec<u32> = ps[0].iter().chain(&a.tokens).chain(&ps[1]).copied().collect();
    let c_req = request(next, four);
    let c = sched.submit(c_req.clone()).unwrap().wait().unwrap();
    assert_eq!(
        c.stats.prompt_processed, 4,
        "only the last answer token and the 3 new ones run"
    );
    assert_eq!(c.tokens, alone(&lm, &c_req, 64).0);
    assert_eq!(sched.counters().prompt_tokens_reused, 6 + 43);
}

#[test]
fn a_request_that_can_never_fit_is_refused() {
    let lm = fixture();
    let mut config = SchedulerConfig::new(&lm, 4, 64);
    let p = prompts(&lm, &[64, 40]);
    let sched = Scheduler::start(lm.clone(), config.clone());
    let e = sched.submit(request(p[0].clone(), settings(0.0, 1, 4))).err().unwrap();
    assert!(e.to_string().contains("the prompt is 64 tokens"), "{e}");
    // A memory budget of 30 tokens: a 40-token prompt can never be held.
    config.kv_bytes = 30 * zagreus::scheduler::kv_bytes_per_token(&lm);
    let sched = Scheduler::start(lm.clone(), config);
    let e = sched.submit(request(p[1].clone(), settings(0.0, 1, 4))).err().unwrap();
    assert!(e.to_string().contains("keys and values"), "{e}");
    // One that fits still runs.
    sched
        .submit(request(p[1][..10].to_vec(), settings(0.0, 1, 4)))
        .unwrap()
        .wait()
        .unwrap();
    // A body's `max_tokens` is unbounded: the largest asks for the whole context, which this
    // budget cannot hold (it must not wrap around to a small reservation).
    let e = sched
        .submit(request(p[1][..10].to_vec(), settings(0.0, 1, usize::MAX)))
        .err()
        .unwrap();
    assert!(e.to_string().contains("keys and values"), "{e}");
    // With room for the context, it runs until the context is full (54 positions after the
    // prompt, and the token sampled from the last of them).
    let sched = Scheduler::start(lm.clone(), SchedulerConfig::new(&lm, 1, 64));
    let mut all = settings(0.0, 1, usize::MAX);
    all.ignore_eos = true;
    let done = sched.submit(request(p[1][..10].to_vec(), all)).unwrap().wait().unwrap();
    assert_eq!((done.tokens.len(), done.finish), (55, FinishReason::Length));
}
