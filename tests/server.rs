//! `zagreus serve` end to end: the real binary on 127.0.0.1 (an ephemeral port) with the real
//! SmolLM2 asset and the fixture models, called over real sockets.

mod common;

use std::time::{Duration, Instant};

use common::cli::run;
use common::server::{read_response, read_until, request, send, spawn_request, Server};
use common::{asset, model_dir};
use serde_json::{json, Value};

fn smollm2() -> String {
    asset("SmolLM2-135M-Instruct.Q4_1.gguf").to_str().unwrap().to_string()
}

fn tied() -> String {
    model_dir("tied-bf16").to_str().unwrap().to_string()
}

fn chat_body(q: &str, max_tokens: usize) -> Value {
    json!({"messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": max_tokens})
}

fn content(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content in {v}"))
        .to_string()
}

/// The text of a streamed answer (chat deltas or completion texts) for choice `index`.
fn streamed_text(chunks: &[Value], index: usize) -> String {
    chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().cloned().unwrap_or_default())
        .filter(|c| c["index"] == index)
        .filter_map(|c| {
            c["delta"]["content"]
                .as_str()
                .or(c["text"].as_str())
                .map(str::to_string)
        })
        .collect()
}

#[test]
fn health_answers_503_while_loading_then_200() {
    let s = Server::start_listening(&["-m", &smollm2()]);
    let first = s.get("/health");
    assert_eq!(first.status, 503, "the model cannot have loaded yet: {first:?}");
    assert_eq!(first.error(), "Loading model");
    assert!(first.header("retry-after").is_some());
    s.wait_ready();
    assert_eq!(s.get("/health").json(), json!({"status": "ok"}));
    let models = s.get("/v1/models").json();
    assert_eq!(models["data"][0]["id"], smollm2());
    assert!(s.stderr().contains("ready:"), "{}", s.stderr());
}

#[test]
fn chat_answers_as_the_one_shot_cli_does_whole_and_streamed() {
    let s = Server::start(&["-m", &smollm2()]);
    let q = "What is the capital of France?";
    let whole = s.post("/v1/chat/completions", &chat_body(q, 24));
    assert_eq!(whole.status, 200, "{}", whole.text());
    let v = whole.json();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let answer = content(&v);
    assert!(answer.contains("Paris"), "{answer}");
    // The one-shot CLI with the same settings says the same.
    let cli = run(&["-m", &smollm2(), "--temperature", "0", "--max-tokens", "24", q], b"");
    assert_eq!(cli.code, 0, "{}", cli.stderr);
    assert_eq!(cli.stdout.trim_end_matches('\n'), answer);
    let usage = &v["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );

    // Streamed: the role first, the same text in pieces, the finish, the usage, [DONE].
    let mut body = chat_body(q, 24);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = s.post("/v1/chat/completions", &body);
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/event-stream"));
    assert_eq!(r.events().last().unwrap(), "[DONE]");
    let chunks = r.chunks();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
    assert_eq!(streamed_text(&chunks, 0), answer);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"], *usage);
    let finish = &chunks[chunks.len() - 2]["choices"][0];
    assert_eq!(finish["finish_reason"], v["choices"][0]["finish_reason"]);
    // Without include_usage there is no usage chunk (it breaks naive proxies).
    body["stream_options"] = json!({});
    let chunks = s.post("/v1/chat/completions", &body).chunks();
    assert!(chunks
        .iter()
        .all(|c| c.get("usage").is_none() && !c["choices"].as_array().unwrap().is_empty()));
}

#[test]
fn stop_strings_are_never_sent_even_when_split_across_tokens() {
    let s = Server::start(&["-m", &smollm2()]);
    let q = "What is the capital of France?";
    let answer = content(&s.post("/v1/chat/completions", &chat_body(q, 24)).json());
    // A stop string that starts inside one token and ends in another.
    let at = answer.find("apital").expect("the answer names the capital");
    let stop = &answer[at..at + 9];
    for stream in [false, true] {
        let mut body = chat_body(q, 24);
        body["stop"] = json!([stop, "never appears"]);
        body["stream"] = json!(stream);
        let r = s.post("/v1/chat/completions", &body);
        let (text, finish) = if stream {
            let chunks = r.chunks();
            let finish = chunks
                .iter()
                .rev()
                .find_map(|c| c["choices"][0]["finish_reason"].as_str().map(str::to_string));
            (streamed_text(&chunks, 0), finish.unwrap())
        } else {
            let v = r.json();
            (
                content(&v),
                v["choices"][0]["finish_reason"].as_str().unwrap().to_string(),
            )
        };
        assert_eq!(text, answer[..at], "stream {stream}");
        assert_eq!(finish, "stop");
    }
}

/// Log-probabilities of each token after the ones before it, computed by the library directly
/// (one sequence, the whole prompt in one forward pass).
fn direct_logprobs(model: &str, ids: &[u32]) -> Vec<f32> {
    let spec = zagreus::loader::ModelSpec {
        model: model.to_string(),
        ..Default::default()
    };
    let (lm, _) = zagreus::loader::load_for(&spec).unwrap();
    let mut cache = lm.model.new_cache(ids.len());
    let mut out = Vec::new();
    lm.model
        .forward(ids, &mut cache, zagreus::model::LogitsFor::All, &mut out)
        .unwrap();
    let vocab = lm.model.vocab_size();
    (1..ids.len())
        .map(|i| zagreus::sampling::log_softmax(&out[(i - 1) * vocab..i * vocab])[ids[i] as usize])
        .collect()
}

#[test]
fn echo_scores_token_id_prompts_as_lm_eval_asks() {
    let s = Server::start(&["-m", &smollm2()]);
    let tok = |text: &str| -> Vec<u32> {
        let r = s.post("/tokenize", &json!({"prompt": text, "add_special_tokens": false}));
        serde_json::from_value(r.json()["tokens"].clone()).unwrap()
    };
    let a = tok("The capital of France is Paris");
    let b = tok("Water boils at one hundred degrees");
    // What lm-eval's local-completions sends for loglikelihood requests (old and new style).
    for (max_tokens, logprobs) in [(1, 1), (0, 10)] {
        let r = s.post(
            "/v1/completions",
            &json!({"model": "x", "prompt": [a, b], "temperature": 0, "max_tokens": max_tokens,
                    "logprobs": logprobs, "seed": 1234, "echo": true}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        let choices = v["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 2);
        for (choice, ids) in choices.iter().zip([&a, &b]) {
            let lp = &choice["logprobs"];
            let token_lps = lp["token_logprobs"].as_array().unwrap();
            assert_eq!(token_lps.len(), ids.len() + max_tokens, "{lp}");
            assert_eq!(token_lps[0], Value::Null);
            assert_eq!(lp["top_logprobs"][0], Value::Null);
            let direct = direct_logprobs(&smollm2(), ids);
            for (i, d) in direct.iter().enumerate() {
                let got64 = token_lps[i + 1].as_f64().unwrap();
                let got = got64 as f32;
                assert!((got - d).abs() < 1e-4, "token {}: server {got}, direct {d}", i + 1);
                // Each position's alternatives hold the token itself and at least `logprobs` more.
                let top = lp["top_logprobs"][i + 1].as_object().unwrap();
                assert!(top.len() >= logprobs.min(2), "{top:?}");
                let best = top.values().map(|x| x.as_f64().unwrap()).fold(f64::MIN, f64::max);
                // Compared as sent: through f32 a value can round above the same number sent.
                assert!(best >= got64, "token {}: {got64} above its alternatives {top:?}", i + 1);
            }
            let offsets: Vec<u64> = serde_json::from_value(lp["text_offset"].clone()).unwrap();
            assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "{offsets:?}");
        }
        assert_eq!(
            v["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
            a.len() + b.len()
        );
    }
    // A text prompt with echo comes back in front of the answer.
    let v = s
        .post(
            "/v1/completions",
            &json!({"prompt": "Once upon a time", "echo": true, "max_tokens": 3, "temperature": 0}),
        )
        .json();
    assert!(
        v["choices"][0]["text"]
            .as_str()
            .unwrap()
            .starts_with("Once upon a time"),
        "{v}"
    );
}

#[test]
fn completions_take_several_prompts_and_n_choices_with_seeds() {
    let s = Server::start(&["-m", &smollm2()]);
    let body = json!({"prompt": ["Once upon a time", "The best pizza is"], "n": 2, "max_tokens": 8,
                      "temperature": 1.0, "seed": 7, "logprobs": 2});
    let v = s.post("/v1/completions", &body).json();
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    let texts: Vec<&str> = choices.iter().map(|c| c["text"].as_str().unwrap()).collect();
    for (k, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], k);
        let lp = &c["logprobs"];
        assert_eq!(
            lp["tokens"].as_array().unwrap().len(),
            lp["token_logprobs"].as_array().unwrap().len()
        );
    }
    // The same seed gives the same choices; each choice of a prompt has its own.
    let again = s.post("/v1/completions", &body).json();
    let texts_again: Vec<&str> = again["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, texts_again);
    assert_ne!(
        (texts[0], texts[2]),
        (texts[1], texts[3]),
        "n choices should differ at temperature 1"
    );
    // Streamed, each choice's pieces carry its index.
    let mut stream = body.clone();
    stream["stream"] = json!(true);
    let chunks = s.post("/v1/completions", &stream).chunks();
    for (k, t) in texts.iter().enumerate() {
        assert_eq!(streamed_text(&chunks, k), *t, "choice {k}");
    }
    // Chat logprobs: the tokens of the answer with their alternatives.
    let mut chat = chat_body("Say hello.", 5);
    chat["logprobs"] = json!(true);
    chat["top_logprobs"] = json!(3);
    let v = s.post("/v1/chat/completions", &chat).json();
    let content_lps = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert!(!content_lps.is_empty());
    assert!(content_lps
        .iter()
        .all(|t| t["top_logprobs"].as_array().unwrap().len() == 3));
}

#[test]
fn bad_requests_get_openai_errors_with_the_right_status() {
    let s = Server::start(&[
        "-m",
        &tied(),
        "--ctx-size",
        "64",
        "--api-key",
        "sekret",
        "--cors-origin",
        "http://example.test",
    ]);
    let auth = [("authorization", "Bearer sekret"), ("content-type", "application/json")];
    let post = |path: &str, body: &[u8]| request(&s.addr, "POST", path, &auth, body).unwrap();
    // Health is public; everything else needs the key.
    assert_eq!(s.get("/health").status, 200);
    let r = s.get("/v1/models");
    assert_eq!(r.status, 401);
    assert!(r.error().contains("API key"));
    let r = request(&s.addr, "GET", "/v1/models", &[("authorization", "Bearer wrong")], b"").unwrap();
    assert_eq!((r.status, r.error().as_str()), (401, "invalid API key"));
    assert_eq!(request(&s.addr, "GET", "/v1/models", &auth, b"").unwrap().status, 200);

    let r = post("/v1/chat/completions", b"{not json");
    assert_eq!(r.status, 400);
    assert!(r.error().contains("not valid JSON"), "{}", r.text());
    let r = post(
        "/v1/chat/completions",
        br#"{"messages": [{"role": "user", "content": "x"}], "top_p": 1.5}"#,
    );
    assert_eq!(r.status, 400);
    assert!(r.error().contains("top_p 1.5"), "{}", r.text());
    let r = post(
        "/v1/chat/completions",
        br#"{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}"#,
    );
    assert_eq!(r.status, 400);
    assert!(r.error().starts_with("temperature: "), "{}", r.text());
    let r = post("/v1/completions", br#"{"prompt": [1, 99999999]}"#);
    assert_eq!(r.status, 400);
    assert!(r.error().contains("99999999"), "{}", r.text());
    // Unknown fields are ignored.
    let r = post(
        "/v1/completions",
        br#"{"prompt": "a b c", "max_tokens": 2, "frobnicate": true}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // A prompt longer than the context: both numbers.
    let long = json!({"prompt": "parola ".repeat(200), "max_tokens": 1}).to_string();
    let r = post("/v1/completions", long.as_bytes());
    assert_eq!(r.status, 400);
    let e = r.error();
    assert!(e.contains("64 tokens") && e.contains("the prompt is"), "{e}");
    let r = request(&s.addr, "GET", "/v1/nothing", &auth, b"").unwrap();
    assert_eq!(r.status, 404);
    assert!(r.error().contains("/v1/nothing"));
    let r = request(&s.addr, "GET", "/v1/chat/completions", &auth, b"").unwrap();
    assert_eq!(r.status, 405);
    r.error();
    // A body over the limit is refused from its declared length, before it is read.
    let mut big = std::net::TcpStream::connect(&s.addr).unwrap();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sekret\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        33 << 20
    );
    std::io::Write::write_all(&mut big, head.as_bytes()).unwrap();
    let r = read_response(big).unwrap();
    assert_eq!(r.status, 413);
    assert!(r.error().contains("32 MiB"));
    // CORS: a preflight from an allowed origin is answered without a key; others get nothing.
    let pre = |origin: &str| {
        request(
            &s.addr,
            "OPTIONS",
            "/v1/chat/completions",
            &[
                ("origin", origin),
                ("access-control-request-method", "POST"),
                ("access-control-request-headers", "authorization, content-type"),
            ],
            b"",
        )
        .unwrap()
    };
    let r = pre("http://example.test");
    assert_eq!(r.status, 204);
    assert_eq!(r.header("access-control-allow-origin"), Some("http://example.test"));
    assert!(r.header("access-control-allow-methods").unwrap().contains("POST"));
    assert!(r
        .header("access-control-allow-headers")
        .unwrap()
        .contains("authorization"));
    assert!(pre("http://evil.test").header("access-control-allow-origin").is_none());
    let r = request(&s.addr, "GET", "/health", &[("origin", "http://example.test")], b"").unwrap();
    assert_eq!(r.header("access-control-allow-origin"), Some("http://example.test"));
    // Every request got its access-log line.
    let lines = [
        "\"POST /v1/chat/completions\" 400",
        "\"GET /v1/nothing\" 404",
        "\"GET /v1/models\" 401",
        "\"POST /v1/completions\" 413",
    ];
    let log = s.stderr_with(&lines);
    for line in lines {
        assert!(log.contains(line), "no {line} in\n{log}");
    }
}

#[test]
fn a_full_queue_answers_503_and_a_client_that_hangs_up_frees_its_sequence() {
    let s = Server::start(&["-m", &smollm2(), "--parallel", "1", "--queue", "1"]);
    let long = json!({"prompt": "a", "max_tokens": 100000, "ignore_eos": true, "stream": true});
    // The first request streams; the second waits; the third is refused.
    let mut first = send(&s.addr, "POST", "/v1/completions", &[], long.to_string().as_bytes()).unwrap();
    read_until(&mut first, "data:");
    s.wait_for(10, "one sequence running", |s| {
        s.metric("zagreus_sequences_running") == 1.0
    });
    let second = send(&s.addr, "POST", "/v1/completions", &[], long.to_string().as_bytes()).unwrap();
    s.wait_for(10, "one request queued", |s| s.metric("zagreus_queue_length") == 1.0);
    let third = s.post("/v1/completions", &long);
    assert_eq!(third.status, 503, "{}", third.text());
    assert!(third.header("retry-after").is_some());
    assert!(third.error().contains("busy"));
    // Hanging up frees the sequence: the waiting request starts, then ends when it hangs up too.
    drop(first);
    s.wait_for(10, "the queue emptied", |s| s.metric("zagreus_queue_length") == 0.0);
    drop(second);
    s.wait_for(10, "no sequence running", |s| {
        s.metric("zagreus_sequences_running") == 0.0
    });
    let log = s.stderr_with(&["499"]);
    assert!(log.contains("499"), "{log}");
    // A whole (not streamed) request whose client hangs up stops too.
    let waiting = send(
        &s.addr,
        "POST",
        "/v1/completions",
        &[],
        json!({"prompt": "a", "max_tokens": 100000, "ignore_eos": true})
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    s.wait_for(10, "one sequence running", |s| {
        s.metric("zagreus_sequences_running") == 1.0
    });
    waiting.shutdown(std::net::Shutdown::Both).unwrap();
    s.wait_for(10, "no sequence running", |s| {
        s.metric("zagreus_sequences_running") == 0.0
    });
}

#[test]
fn a_request_past_the_timeout_gets_504() {
    let s = Server::start(&["-m", &smollm2(), "--timeout", "1"]);
    let t = Instant::now();
    let r = s.post(
        "/v1/completions",
        &json!({"prompt": "a", "max_tokens": 100000, "ignore_eos": true}),
    );
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(r.error().contains("1 s"));
    assert!(t.elapsed() < Duration::from_secs(10));
    s.wait_for(10, "no sequence running", |s| {
        s.metric("zagreus_sequences_running") == 0.0
    });
}

#[test]
fn thirty_two_clients_at_once_each_get_their_own_answer() {
    let s = Server::start(&["-m", &smollm2(), "--parallel", "8"]);
    let bodies: Vec<Value> = (0..32)
        .map(|i| match i % 2 {
            0 => chat_body(&format!("Write the number {i} in words."), 10),
            _ => json!({"prompt": format!("Item {i}: the"), "max_tokens": 10, "temperature": 0}),
        })
        .collect();
    let path = |b: &Value| {
        if b.get("messages").is_some() {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        }
    };
    let text = |v: &Value| -> String {
        let c = &v["choices"][0];
        c["message"]["content"]
            .as_str()
            .or(c["text"].as_str())
            .unwrap()
            .to_string()
    };
    // Alone, one at a time.
    let alone: Vec<String> = bodies.iter().map(|b| text(&s.post(path(b), b).json())).collect();
    // All at once: every answer complete and the same as alone (nothing lost, nothing mixed).
    let pending: Vec<_> = bodies
        .iter()
        .map(|b| spawn_request(&s.addr, "POST", path(b), b.clone()))
        .collect();
    for (i, rx) in pending.into_iter().enumerate() {
        let r = rx.recv_timeout(Duration::from_secs(300)).unwrap().unwrap();
        assert_eq!(r.status, 200, "client {i}: {}", r.text());
        assert_eq!(text(&r.json()), alone[i], "client {i}");
    }
    assert!(s.metric("zagreus_requests_total{status=\"200\"}") >= 64.0);
}

#[test]
fn tokenizer_endpoints_round_trip() {
    let s = Server::start(&["-m", &smollm2()]);
    let info = s.get("/tokenizer_info").json();
    assert_eq!(info["eos_token"], "<|im_end|>");
    assert!(info["chat_template"].as_str().unwrap().contains("im_start"));
    let text = "Ciao, come stai? È un bel giorno.";
    let t = s
        .post("/tokenize", &json!({"prompt": text, "add_special_tokens": false}))
        .json();
    let ids = t["tokens"].as_array().unwrap();
    assert_eq!(t["count"], ids.len());
    assert_eq!(s.post("/detokenize", &json!({"tokens": ids})).json()["prompt"], text);
    // The EOS token's text is one token (lm-eval's remote tokenizer reads its id this way).
    let eos = s
        .post(
            "/tokenize",
            &json!({"prompt": "<|im_end|>", "add_special_tokens": false}),
        )
        .json();
    assert_eq!(eos["tokens"].as_array().unwrap().len(), 1);
    let chat = s
        .post("/tokenize", &json!({"messages": [{"role": "user", "content": "hi"}]}))
        .json();
    assert!(chat["count"].as_u64().unwrap() > 3);
    let r = s.post("/detokenize", &json!({"tokens": [1, "x"]}));
    assert_eq!(r.status, 400);
    let metrics = s.get("/metrics");
    assert!(metrics.header("content-type").unwrap().starts_with("text/plain"));
    let m = metrics.text();
    for name in [
        "zagreus_requests_total",
        "zagreus_time_to_first_token_seconds_bucket",
        "zagreus_queue_length",
        "zagreus_sequences_running",
    ] {
        assert!(m.contains(name), "{m}");
    }
}

#[test]
fn sigterm_lets_running_requests_finish_then_exits_0() {
    let mut s = Server::start(&["-m", &smollm2(), "--grace", "60"]);
    let body = json!({"prompt": "Once upon a time", "max_tokens": 64, "ignore_eos": true, "temperature": 0});
    let stream = send(&s.addr, "POST", "/v1/completions", &[], body.to_string().as_bytes()).unwrap();
    s.wait_for(10, "one sequence running", |s| {
        s.metric("zagreus_sequences_running") == 1.0
    });
    unsafe { libc::kill(s.child.id() as i32, libc::SIGTERM) };
    let r = read_response(stream).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["usage"]["completion_tokens"], 64);
    let status = s.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", s.stderr());
    assert!(s.stderr_with(&["shutting down"]).contains("shutting down"));
    assert!(
        request(&s.addr, "GET", "/health", &[], b"").is_err(),
        "still accepting after the shutdown"
    );
}

#[test]
fn the_chat_page_is_served_at_the_root_unless_turned_off() {
    let s = Server::start(&["-m", &tied(), "--api-key", "k"]);
    // The page and its assets are public (the page asks for the key itself).
    let page = s.get("/");
    assert_eq!(page.status, 200);
    assert!(page.header("content-type").unwrap().starts_with("text/html"));
    assert!(page
        .header("content-security-policy")
        .unwrap()
        .contains("default-src 'self'"));
    assert!(page.text().contains("/webui/app.js"));
    for (path, kind) in [("/webui/app.js", "text/javascript"), ("/webui/style.css", "text/css")] {
        let r = s.get(path);
        assert_eq!(r.status, 200, "{path}");
        assert!(r.header("content-type").unwrap().starts_with(kind), "{path}");
    }
    assert_eq!(s.get("/v1/models").status, 401);
    drop(s);
    let s = Server::start(&["-m", &tied(), "--no-webui"]);
    assert_eq!(s.get("/").status, 404);
    assert_eq!(s.get("/webui/app.js").status, 404);
}
