//! The chat REPL driven in a real pseudo-terminal, as a person would: streaming, Ctrl+C during an
//! answer, slash commands, multi-line input, bracketed paste, persistent history, Ctrl+D.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use assert_cmd::cargo::cargo_bin;
use common::{model_dir, GREEDY};
use expectrl::{ControlCode, Expect, Session};

type Pty = expectrl::session::OsSession;

fn spawn(home: &Path, args: &[&str], envs: &[(&str, &str)]) -> Pty {
    let mut c = Command::new(cargo_bin("zagreus"));
    c.args(args)
        .env("HOME", home)
        .env("ZAGREUS_HISTORY_FILE", home.join("history.txt"))
        .env("NO_COLOR", "1")
        .env("TERM", "xterm")
        .env_remove("ZAGREUS_NO_HISTORY")
        .env_remove("ZAGREUS_MODEL");
    for (k, v) in envs {
        c.env(k, v);
    }
    let mut s = Session::spawn(c).expect("spawn in a pty");
    s.set_expect_timeout(Some(Duration::from_secs(20)));
    s
}

fn tied() -> String {
    model_dir("tied-bf16").display().to_string()
}

fn chat_args(model: &str, extra: &[&str]) -> Vec<String> {
    let head = ["chat", "-m", model, "-n", "5"].into_iter().chain(GREEDY);
    head.chain(extra.iter().copied()).map(str::to_string).collect()
}

fn prompt(s: &mut Pty) {
    if let Err(e) = s.expect(">>> ") {
        let mut buf = vec![0u8; 4096];
        let n = s.try_read(&mut buf).unwrap_or(0);
        panic!(
            "the >>> prompt: {e:?}; pending output: {:?}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
}

fn exit_code(s: &Pty) -> String {
    format!("{:?}", s.get_process().wait().unwrap())
}

/// Saves the conversation with /save and reads it back.
fn saved(s: &mut Pty, dir: &Path) -> serde_json::Value {
    let f = dir.join("conv.json");
    let _ = std::fs::remove_file(&f);
    s.send_line(format!("/save {}", f.display())).unwrap();
    s.expect("saved").unwrap();
    prompt(s);
    serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap()
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(|s| s.as_str()).collect()
}

#[test]
fn a_conversation_with_slash_commands() {
    let home = tempfile::tempdir().unwrap();
    let m = tied();
    let args = chat_args(&m, &[]);
    let mut s = spawn(home.path(), &strs(&args), &[]);
    s.expect("/help for commands").unwrap();
    prompt(&mut s);
    s.send_line("Ciao!").unwrap();
    prompt(&mut s);
    let conv = saved(&mut s, home.path());
    assert_eq!(conv[0]["role"], "user");
    assert_eq!(conv[0]["content"], "Ciao!");
    assert_eq!(conv[1]["role"], "assistant");
    let first_answer = conv[1]["content"].clone();

    s.send_line("/verbose").unwrap();
    s.expect("statistics on").unwrap();
    prompt(&mut s);
    s.send_line("/regen").unwrap();
    s.expect("time to first token").unwrap();
    let stats = s.expect(">>> ").unwrap();
    let stats = String::from_utf8_lossy(stats.before()).to_string();
    assert!(stats.contains("context"), "{stats}");
    let conv = saved(&mut s, home.path());
    assert_eq!(conv.as_array().unwrap().len(), 2, "regen replaces the answer");
    assert_eq!(conv[1]["content"], first_answer, "greedy: the same answer again");

    s.send_line("/system Sei un pirata.").unwrap();
    s.expect("system prompt set").unwrap();
    prompt(&mut s);
    s.send_line("/system").unwrap();
    s.expect("Sei un pirata.").unwrap();
    prompt(&mut s);
    s.send_line("/set temperature 0").unwrap();
    s.expect("temperature set to 0").unwrap();
    prompt(&mut s);
    s.send_line("/set top_p 7").unwrap();
    s.expect("out of range").unwrap();
    prompt(&mut s);
    s.send_line("Di più").unwrap();
    s.expect("new, ").unwrap(); // the statistics line counts only new prompt tokens
    prompt(&mut s);
    let conv = saved(&mut s, home.path());
    assert_eq!(conv[0]["role"], "system");
    assert_eq!(conv.as_array().unwrap().len(), 5);

    s.send_line("/undo").unwrap();
    s.expect("dropped the last exchange").unwrap();
    prompt(&mut s);
    assert_eq!(saved(&mut s, home.path()).as_array().unwrap().len(), 3);

    s.send_line("/show").unwrap();
    s.expect("context").unwrap();
    s.expect("available").unwrap();
    prompt(&mut s);

    // Save, clear, load: the round trip restores the conversation.
    let keep = home.path().join("keep.json");
    s.send_line(format!("/save {}", keep.display())).unwrap();
    s.expect("saved 3 messages").unwrap();
    prompt(&mut s);
    s.send_line("/clear").unwrap();
    s.expect("new conversation").unwrap();
    prompt(&mut s);
    assert_eq!(
        saved(&mut s, home.path()).as_array().unwrap().len(),
        1,
        "the system prompt stays"
    );
    s.send_line(format!("/load {}", keep.display())).unwrap();
    s.expect("loaded 3 messages").unwrap();
    prompt(&mut s);
    assert_eq!(
        saved(&mut s, home.path()),
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&keep).unwrap()).unwrap()
    );

    s.send_line("/regn").unwrap();
    s.expect("did you mean /regen").unwrap();
    prompt(&mut s);
    s.send(ControlCode::EndOfText).unwrap(); // Ctrl+C at an empty prompt
    s.expect("Ctrl+D or /bye to quit").unwrap();
    s.send(ControlCode::EndOfTransmission).unwrap(); // Ctrl+D
    s.expect(expectrl::Eof).unwrap();
    assert!(exit_code(&s).contains(", 0)"), "{}", exit_code(&s));
}

#[test]
fn ctrl_c_stops_a_long_answer_and_keeps_the_session() {
    let home = tempfile::tempdir().unwrap();
    // The fixture model with a long context, so an answer can run for many seconds.
    let m = home.path().join("long");
    std::fs::create_dir_all(&m).unwrap();
    for e in std::fs::read_dir(model_dir("tied-bf16")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), m.join(e.file_name())).unwrap();
    }
    let cfg = std::fs::read_to_string(m.join("config.json")).unwrap();
    std::fs::write(
        m.join("config.json"),
        cfg.replace("\"max_position_embeddings\": 64", "\"max_position_embeddings\": 200000"),
    )
    .unwrap();
    let ms = m.display().to_string();
    let args = chat_args(&ms, &["--ignore-eos", "-n", "1000000"]);
    let mut s = spawn(home.path(), &strs(&args), &[]);
    prompt(&mut s);
    s.send_line("Ciao!").unwrap();
    s.expect(expectrl::NBytes(200)).unwrap(); // the answer is streaming
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    s.send(ControlCode::EndOfText).unwrap();
    s.expect("answer interrupted").unwrap();
    prompt(&mut s);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "generation stopped after {:?}",
        t.elapsed()
    );
    let conv = saved(&mut s, home.path());
    assert_eq!(conv[1]["role"], "assistant");
    assert_eq!(conv[1]["interrupted"], true, "the partial answer stays, marked");
    assert!(!conv[1]["content"].as_str().unwrap().is_empty());
    s.send_line("/bye").unwrap();
    s.expect(expectrl::Eof).unwrap();
    assert!(exit_code(&s).contains(", 0)"), "{}", exit_code(&s));
}

#[test]
fn multiline_blocks_and_bracketed_paste_are_one_message() {
    let home = tempfile::tempdir().unwrap();
    let m = tied();
    let args = chat_args(&m, &["-n", "1"]);
    let mut s = spawn(home.path(), &strs(&args), &[]);
    prompt(&mut s);
    s.send_line("\"\"\"").unwrap();
    s.expect("... ").unwrap();
    s.send_line("riga uno").unwrap();
    // Wait for each continuation prompt: the terminal line editor re-arms between lines.
    s.expect("... ").unwrap();
    s.send_line("riga due\"\"\"").unwrap();
    prompt(&mut s);
    let conv = saved(&mut s, home.path());
    assert_eq!(conv[0]["content"], "riga uno\nriga due");
    s.send("\x1b[200~incollato\nsu due righe\x1b[201~").unwrap();
    s.send("\r").unwrap();
    prompt(&mut s);
    let conv = saved(&mut s, home.path());
    assert_eq!(conv[2]["content"], "incollato\nsu due righe");
    s.send_line("/bye").unwrap();
    s.expect(expectrl::Eof).unwrap();
}

#[test]
fn history_persists_across_runs_and_can_be_turned_off() {
    let home = tempfile::tempdir().unwrap();
    let m = tied();
    let args = chat_args(&m, &["-n", "1"]);
    let mut s = spawn(home.path(), &strs(&args), &[]);
    prompt(&mut s);
    s.send_line("ricordami").unwrap();
    prompt(&mut s);
    s.send_line("/bye").unwrap();
    s.expect(expectrl::Eof).unwrap();
    let history = std::fs::read_to_string(home.path().join("history.txt")).unwrap();
    assert!(history.contains("ricordami"), "{history}");

    // A second run: up arrow twice reaches the message of the first run (after /bye).
    let mut s = spawn(home.path(), &strs(&args), &[]);
    prompt(&mut s);
    s.send("\x1b[A").unwrap();
    s.send("\x1b[A").unwrap();
    s.send("\r").unwrap();
    prompt(&mut s);
    let conv = saved(&mut s, home.path());
    assert_eq!(conv[0]["content"], "ricordami");
    s.send_line("/bye").unwrap();
    s.expect(expectrl::Eof).unwrap();

    // ZAGREUS_NO_HISTORY: nothing read or written.
    let other = tempfile::tempdir().unwrap();
    let mut s = spawn(other.path(), &strs(&args), &[("ZAGREUS_NO_HISTORY", "1")]);
    prompt(&mut s);
    s.send_line("segreto").unwrap();
    prompt(&mut s);
    s.send_line("/bye").unwrap();
    s.expect(expectrl::Eof).unwrap();
    assert!(!other.path().join("history.txt").exists());
}

#[test]
fn no_prompt_on_a_terminal_opens_the_chat() {
    let home = tempfile::tempdir().unwrap();
    let m = tied();
    let mut s = spawn(home.path(), &["-m", &m], &[]);
    s.expect("/help for commands").unwrap();
    prompt(&mut s);
    s.send(ControlCode::EndOfTransmission).unwrap();
    s.expect(expectrl::Eof).unwrap();
    assert!(exit_code(&s).contains(", 0)"), "{}", exit_code(&s));
}

#[test]
fn chat_with_piped_stdin_answers_once_and_never_waits_at_a_prompt() {
    let out = Command::new(cargo_bin("zagreus"))
        .args(["chat", "-m", &tied(), "--temperature", "0", "-n", "3"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(b"Ciao!")?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains(">>>"), "{stdout}");
    assert!(!stdout.is_empty());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("/help"));
}

#[test]
fn a_real_gguf_model_chats_in_the_terminal() {
    let home = tempfile::tempdir().unwrap();
    let m = common::asset("SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut s = spawn(
        home.path(),
        &["chat", "-m", m.to_str().unwrap(), "--temperature", "0"],
        &[],
    );
    prompt(&mut s);
    s.send_line("What is the capital of France? Answer in one sentence.")
        .unwrap();
    s.expect("The capital of France is Paris.").unwrap();
    prompt(&mut s);
    s.send_line("/bye").unwrap();
    s.expect(expectrl::Eof).unwrap();
}

#[test]
fn tools_in_the_chat_a_call_then_its_result() {
    let home = tempfile::tempdir().unwrap();
    let m = common::asset("SmolLM2-135M-Instruct.Q4_1.gguf");
    let tools = home.path().join("tools.json");
    std::fs::write(
        &tools,
        r#"[{"type": "function", "function": {"name": "meteo", "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"citta": {"type": "string", "maxLength": 20}},
            "required": ["citta"], "additionalProperties": false}}}]"#,
    )
    .unwrap();
    let template = common::fixtures().join("templates/nesso-agentic.jinja");
    let mut s = spawn(
        home.path(),
        &[
            "chat",
            "-m",
            m.to_str().unwrap(),
            "--chat-template",
            template.to_str().unwrap(),
            "--temperature",
            "0",
            "-n",
            "60",
            "--verbose",
        ],
        &[],
    );
    prompt(&mut s);
    s.send_line(format!("/tools {}", tools.display())).unwrap();
    s.expect("1 tool from").unwrap();
    prompt(&mut s);
    s.send_line("/tool-choice meteo").unwrap();
    s.expect("tool choice: meteo").unwrap();
    prompt(&mut s);
    s.send_line("What is the weather in Rome?").unwrap();
    s.expect("→ tool call meteo {\"citta\":").unwrap();
    s.expect("/tool-result").unwrap();
    prompt(&mut s);
    // The choice stays `meteo`: after results the model answers freely all the same.
    // Each call gets its result (the model may have made more than one); then it answers.
    let mut results = 0;
    loop {
        s.send_line("/tool-result {\"temperatura\": 21, \"cielo\": \"sereno\"}")
            .unwrap();
        results += 1;
        let got = s
            .expect(expectrl::Regex("more call\\(s\\) to answer|time to first token"))
            .unwrap();
        if !String::from_utf8_lossy(got.get(0).unwrap()).contains("more call") {
            break;
        }
        prompt(&mut s);
        assert!(results < 4);
    }
    prompt(&mut s);
    let conv = saved(&mut s, home.path());
    let roles: Vec<&str> = conv
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    let mut want = vec!["user", "assistant"];
    want.extend(std::iter::repeat_n("tool", results));
    want.push("assistant");
    assert_eq!(roles, want, "{conv}");
    let calls = conv[1]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), results);
    for (i, call) in calls.iter().enumerate() {
        assert_eq!(call["function"]["name"], "meteo");
        assert_eq!(conv[2 + i]["tool_call_id"], call["id"]);
    }
    assert!(conv[2 + results]["content"].as_str().unwrap().contains("21"), "{conv}");
    s.send_line("/tool-result again").unwrap();
    s.expect("no tool call waiting").unwrap();
    prompt(&mut s);
    s.send_line("/bye").unwrap();
    s.expect(expectrl::Eof).unwrap();
}
