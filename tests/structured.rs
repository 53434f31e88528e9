//! Constrained decoding and tool calls. A random-weight model writes garbage unless it is
//! constrained, so 50 seeds of it under a JSON schema (and under forced tool calls) prove the
//! constraint: every answer must parse and validate. The real SmolLM2 asset with a Nesso-style
//! (Hermes) template runs a call and tool-result round trip.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::cli::{assert_clean_error, copy_model, run, Out};
use common::{asset, fixtures, model_dir};
use serde_json::{json, Value};
use zagreus::loader::{self, ModelSpec};
use zagreus::structured::Structure;
use zagreus::tools::{parse_tools, ToolChoice};

/// The random fixture with room for a tool prompt: its weights do not depend on the context.
fn long_context_model(dir: &Path) -> PathBuf {
    let to = dir.join("model");
    copy_model(&model_dir("tied-bf16"), &to);
    let cfg_path = to.join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["max_position_embeddings"] = json!(2048);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    to
}

fn nesso_template() -> String {
    fixtures().join("templates/nesso-agentic.jinja").display().to_string()
}

/// `zagreus -m MODEL --chat-template <Nesso-style> --tools TOOLS ARGS...`.
fn run_with_tools(model: &str, tools: &str, args: &[&str]) -> Out {
    let t = nesso_template();
    let head = ["-m", model, "--chat-template", t.as_str(), "--tools", tools];
    run(&[&head[..], args].concat(), b"")
}

/// A schema a random model can finish: every string and list is bounded.
fn person_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "nome": {"type": "string", "maxLength": 12},
            "eta": {"type": "integer", "minimum": 0, "maximum": 130},
            "ruolo": {"enum": ["studente", "docente", "altro"]},
            "attivo": {"type": "boolean"},
            "lingue": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
            "indirizzo": {
                "type": "object",
                "properties": {"citta": {"type": "string", "maxLength": 10}, "cap": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["citta", "cap"],
                "additionalProperties": false
            },
            "nota": {"type": ["string", "null"], "maxLength": 8}
        },
        "required": ["nome", "eta", "ruolo", "attivo", "lingue", "indirizzo"],
        "additionalProperties": false
    })
}

fn tools_json() -> Value {
    json!([
        {"type": "function", "function": {"name": "meteo", "description": "Il meteo di una città",
            "parameters": {"type": "object", "properties": {
                "citta": {"type": "string", "maxLength": 12},
                "unita": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["citta", "unita"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "somma", "description": "Somma due numeri",
            "parameters": {"type": "object", "properties": {
                "a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                "b": {"type": "integer", "minimum": -1000, "maximum": 1000}},
                "required": ["a", "b"], "additionalProperties": false}}}
    ])
}

/// Checks `v` against the subset of JSON Schema the tests use; the error says where it fails.
fn validate(v: &Value, schema: &Value, at: &str) -> Result<(), String> {
    let fail = |why: &str| Err(format!("{at}: {why} (value {v})"));
    if let Some(options) = schema.get("enum").and_then(Value::as_array) {
        if !options.contains(v) {
            return fail("not in the enum");
        }
    }
    let types: Vec<&str> = match schema.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if !types.is_empty() {
        let ok = types.iter().any(|t| match *t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            "null" => v.is_null(),
            _ => false,
        });
        if !ok {
            return fail(&format!("not of type {types:?}"));
        }
    }
    match v {
        Value::Object(o) => {
            let props = schema.get("properties").and_then(Value::as_object);
            for r in schema.get("required").and_then(Value::as_array).into_iter().flatten() {
                if !o.contains_key(r.as_str().unwrap()) {
                    return fail(&format!("lacks {r}"));
                }
            }
            for (k, x) in o {
                match props.and_then(|p| p.get(k)) {
                    Some(s) => validate(x, s, &format!("{at}.{k}"))?,
                    None if schema.get("additionalProperties") == Some(&json!(false)) => {
                        return fail(&format!("has the extra property {k}"))
                    }
                    None => {}
                }
            }
        }
        Value::Array(a) => {
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64) {
                if a.len() as u64 > max {
                    return fail("too many items");
                }
            }
            if let Some(items) = schema.get("items") {
                for (i, x) in a.iter().enumerate() {
                    validate(x, items, &format!("{at}[{i}]"))?;
                }
            }
        }
        Value::String(s) => {
            if let Some(max) = schema.get("maxLength").and_then(Value::as_u64) {
                if s.chars().count() as u64 > max {
                    return fail("too long");
                }
            }
            if schema.get("pattern") == Some(&json!("^[0-9]{5}$"))
                && !(s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit()))
            {
                return fail("does not match the pattern");
            }
        }
        Value::Number(n) => {
            let x = n.as_f64().unwrap();
            if schema.get("minimum").and_then(Value::as_f64).is_some_and(|m| x < m)
                || schema.get("maximum").and_then(Value::as_f64).is_some_and(|m| x > m)
            {
                return fail("out of range");
            }
        }
        _ => {}
    }
    Ok(())
}

#[test]
fn the_validator_used_here_rejects_what_it_should() {
    let s = person_schema();
    let good = json!({"nome": "Ada", "eta": 36, "ruolo": "docente", "attivo": true, "lingue": ["it"],
        "indirizzo": {"citta": "Roma", "cap": "00100"}});
    validate(&good, &s, "$").unwrap();
    for bad in [
        json!({"nome": "Ada", "eta": 36, "ruolo": "docente", "attivo": true, "lingue": ["it"]}),
        json!({"nome": "Ada", "eta": 136, "ruolo": "docente", "attivo": true, "lingue": [], "indirizzo": {"citta": "R", "cap": "00100"}}),
        json!({"nome": "Ada", "eta": 36, "ruolo": "preside", "attivo": true, "lingue": [], "indirizzo": {"citta": "R", "cap": "00100"}}),
        json!({"nome": "Ada", "eta": 36, "ruolo": "altro", "attivo": true, "lingue": [], "indirizzo": {"citta": "R", "cap": "0010"}}),
        json!({"nome": "Ada", "eta": 36, "ruolo": "altro", "attivo": true, "lingue": [], "indirizzo": {"citta": "R", "cap": "00100"}, "x": 1}),
    ] {
        assert!(validate(&bad, &s, "$").is_err(), "{bad}");
    }
}

/// Runs `zagreus batch` over OpenAI batch lines; returns each line's response body.
fn batch(model: &Path, template: Option<&str>, bodies: &[Value]) -> Vec<Value> {
    let input: String = bodies
        .iter()
        .enumerate()
        .map(|(i, b)| {
            json!({"custom_id": format!("r{i}"), "method": "POST", "url": "/v1/chat/completions", "body": b})
                .to_string()
                + "\n"
        })
        .collect();
    let m = model.display().to_string();
    let mut args = vec!["batch", "-m", m.as_str(), "--parallel", "8"];
    if let Some(t) = template {
        args.extend(["--chat-template", t]);
    }
    args.push("-");
    let out = run(&args, input.as_bytes());
    assert_eq!(out.code, 0, "{}", out.stderr);
    out.stdout
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            assert!(v["error"].is_null(), "{v}");
            v["response"]["body"].clone()
        })
        .collect()
}

#[test]
fn fifty_seeds_of_a_random_model_under_a_schema_all_parse_and_validate() {
    let dir = tempfile::tempdir().unwrap();
    let model = long_context_model(dir.path());
    let schema = person_schema();
    let bodies: Vec<Value> = (0..50)
        .map(|seed| {
            json!({"messages": [{"role": "user", "content": "Descrivi una persona."}],
                "seed": seed, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "max_tokens": 400,
                "response_format": {"type": "json_schema", "json_schema": {"name": "persona", "schema": schema}}})
        })
        .collect();
    let answers = batch(&model, None, &bodies);
    assert_eq!(answers.len(), 50);
    let mut distinct = std::collections::BTreeSet::new();
    for (seed, a) in answers.iter().enumerate() {
        let choice = &a["choices"][0];
        assert_eq!(choice["finish_reason"], "stop", "seed {seed}: {choice}");
        let text = choice["message"]["content"].as_str().unwrap();
        let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("seed {seed}: {e}: {text}"));
        validate(&v, &schema, "$").unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        distinct.insert(text.to_string());
    }
    // The model really sampled (a constraint that forced one fixed answer would also "pass").
    assert!(distinct.len() > 40, "{} distinct answers", distinct.len());
    // Unconstrained, the same model writes text that is not JSON.
    let free = batch(
        &model,
        None,
        &[
            json!({"messages": [{"role": "user", "content": "Descrivi una persona."}], "seed": 1, "temperature": 1.0, "max_tokens": 40}),
        ],
    );
    let text = free[0]["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(serde_json::from_str::<Value>(text).is_err(), "{text}");
}

#[test]
fn fifty_seeds_of_forced_tool_calls_name_a_given_tool_with_valid_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let model = long_context_model(dir.path());
    let tools = tools_json();
    let schemas: Vec<(String, Value)> = tools
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["function"]["name"].as_str().unwrap().to_string(),
                t["function"]["parameters"].clone(),
            )
        })
        .collect();
    let choice = |seed: usize| match seed % 3 {
        0 => json!("required"),
        1 => json!({"type": "function", "function": {"name": "somma"}}),
        _ => json!({"type": "function", "function": {"name": "meteo"}}),
    };
    let bodies: Vec<Value> = (0..50)
        .map(|seed| {
            json!({"messages": [{"role": "user", "content": "Che tempo fa a Roma?"}], "tools": tools,
                "tool_choice": choice(seed), "parallel_tool_calls": seed % 2 == 0,
                "seed": seed, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "max_tokens": 300})
        })
        .collect();
    let template = nesso_template();
    let answers = batch(&model, Some(&template), &bodies);
    for (seed, a) in answers.iter().enumerate() {
        let c = &a["choices"][0];
        let calls = c["message"]["tool_calls"].as_array().unwrap();
        assert!(!calls.is_empty());
        if seed % 2 == 1 {
            // One call, then the end.
            assert_eq!(c["finish_reason"], "tool_calls", "seed {seed}: {c}");
            assert_eq!(calls.len(), 1, "seed {seed}: parallel_tool_calls false");
            assert_eq!(c["message"]["content"], Value::Null, "seed {seed}: {c}");
        } else {
            // A random model may chain calls until max_tokens cuts the last one (then reported
            // as text); every complete one must be valid.
            assert!(
                ["tool_calls", "length"].contains(&c["finish_reason"].as_str().unwrap()),
                "seed {seed}: {c}"
            );
        }
        for call in calls {
            assert_eq!(call["type"], "function");
            assert!(call["id"].as_str().unwrap().starts_with("call_"));
            let name = call["function"]["name"].as_str().unwrap();
            match seed % 3 {
                1 => assert_eq!(name, "somma"),
                2 => assert_eq!(name, "meteo"),
                _ => {}
            }
            let (_, schema) = schemas
                .iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("seed {seed}: unknown tool {name}"));
            let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
            validate(&args, schema, name).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        }
    }
}

#[test]
fn tool_parameters_with_definitions_and_references_work() {
    let dir = tempfile::tempdir().unwrap();
    let model = long_context_model(dir.path());
    // As pydantic writes them: `$defs` and `$ref`s into them, a reference to the root.
    let tools = json!([{"type": "function", "function": {"name": "ordina", "parameters": {
        "$defs": {"Unita": {"enum": ["kg", "pezzi"]},
                  "Riga": {"type": "object", "properties": {"cosa": {"type": "string", "maxLength": 8}, "unita": {"$ref": "#/$defs/Unita"}},
                           "required": ["cosa", "unita"], "additionalProperties": false}},
        "type": "object",
        "properties": {"righe": {"type": "array", "items": {"$ref": "#/$defs/Riga"}, "minItems": 1, "maxItems": 2},
                       "urgente": {"type": "boolean"}},
        "required": ["righe", "urgente"], "additionalProperties": false}}}]);
    let bodies: Vec<Value> = (0..10)
        .map(|seed| {
            json!({"messages": [{"role": "user", "content": "Ordina"}], "tools": tools, "tool_choice": "required",
                "parallel_tool_calls": false, "seed": seed, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "max_tokens": 300})
        })
        .collect();
    for a in batch(&model, Some(&nesso_template()), &bodies) {
        let c = &a["choices"][0];
        assert_eq!(c["finish_reason"], "tool_calls", "{c}");
        let args: Value =
            serde_json::from_str(c["message"]["tool_calls"][0]["function"]["arguments"].as_str().unwrap()).unwrap();
        let righe = args["righe"].as_array().unwrap();
        assert!((1..=2).contains(&righe.len()) && args["urgente"].is_boolean(), "{args}");
        for r in righe {
            assert!(["kg", "pezzi"].contains(&r["unita"].as_str().unwrap()), "{args}");
            assert!(r["cosa"].as_str().unwrap().chars().count() <= 8, "{args}");
        }
    }
}

#[test]
fn the_cli_prints_calls_as_json_lines_and_json_answers_that_validate() {
    let dir = tempfile::tempdir().unwrap();
    let model = long_context_model(dir.path());
    let m = model.display().to_string();
    let tools = dir.path().join("tools.json");
    std::fs::write(&tools, tools_json().to_string()).unwrap();
    let schema = dir.path().join("schema.json");
    std::fs::write(&schema, person_schema().to_string()).unwrap();
    let (tools, schema) = (tools.display().to_string(), schema.display().to_string());
    for seed in ["1", "2", "3"] {
        let with_tools = |extra: &[&str]| {
            let tail = ["--no-parallel-tool-calls", "--seed", seed, "-n", "300", "Ciao"];
            run_with_tools(&m, &tools, &[extra, &tail].concat())
        };
        // Text mode: the stdout line is the call.
        let out = with_tools(&["--tool-choice", "required"]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert_eq!(out.stdout.lines().count(), 1, "{}", out.stdout);
        for line in out.stdout.lines() {
            let call: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            assert!(["meteo", "somma"].contains(&call["name"].as_str().unwrap()), "{call}");
            assert!(call["arguments"].is_object() && call["id"].as_str().unwrap().starts_with("call_"));
        }
        // --json: the record has the calls.
        let out = with_tools(&["--tool-choice", "somma", "--json"]);
        let rec: Value = serde_json::from_str(&out.stdout).unwrap();
        let calls = rec["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1, "{rec}");
        assert_eq!(calls[0]["name"], "somma");
        validate(
            &calls[0]["arguments"],
            &tools_json()[1]["function"]["parameters"],
            "somma",
        )
        .unwrap();
        // --json-schema
        let out = run(
            &["-m", &m, "--json-schema", &schema, "--seed", seed, "-n", "400", "Ciao"],
            b"",
        );
        assert_eq!(out.code, 0, "{}", out.stderr);
        let v: Value = serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {}", out.stdout));
        validate(&v, &person_schema(), "$").unwrap();
    }
}

#[test]
fn bad_tool_and_schema_requests_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let model = long_context_model(dir.path());
    let m = model.display().to_string();
    let tools = dir.path().join("tools.json");
    std::fs::write(&tools, tools_json().to_string()).unwrap();
    let tools = tools.display().to_string();
    let bad_json = dir.path().join("bad.json");
    std::fs::write(&bad_json, "{not json").unwrap();
    let bad_json = bad_json.display().to_string();
    let t = nesso_template();
    // The fixture's own template (ChatML) has no tool syntax.
    assert_clean_error(&run(&["-m", &m, "--tools", &tools, "x"], b""), &["no tool syntax"]);
    let with_tools = |extra: &[&str]| run_with_tools(&m, &tools, &[extra, &["x"]].concat());
    assert_clean_error(
        &with_tools(&["--tool-choice", "oroscopo"]),
        &["oroscopo", "not among the tools"],
    );
    assert_clean_error(
        &run(&["-m", &m, "--json-schema", &bad_json, "x"], b""),
        &[&bad_json, "not valid JSON"],
    );
    assert_clean_error(
        &run(&["-m", &m, "--chat-template", &t, "--tools", &bad_json, "x"], b""),
        &[&bad_json],
    );
    let schema = dir.path().join("s.json");
    std::fs::write(
        &schema,
        r#"{"type": "object", "properties": {"a": {"type": "string", "pattern": "(unclosed"}}}"#,
    )
    .unwrap();
    assert_clean_error(
        &run(&["-m", &m, "--json-schema", schema.to_str().unwrap(), "x"], b""),
        &["grammar"],
    );
    let schema_file = dir.path().join("obj.json");
    std::fs::write(&schema_file, r#"{"type": "object"}"#).unwrap();
    assert_clean_error(
        &with_tools(&["--json-schema", schema_file.to_str().unwrap()]),
        &["exclude each other"],
    );
    let out: Out = run(&["-m", &m, "--tool-choice", "auto", "x"], b"");
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("--tools"), "{}", out.stderr);
}

#[test]
fn a_lazy_grammar_leaves_text_free_and_constrains_a_call_once_opened() {
    let dir = tempfile::tempdir().unwrap();
    let model = long_context_model(dir.path());
    let spec = ModelSpec {
        model: model.display().to_string(),
        ..Default::default()
    };
    let (lm, _) = loader::load_for(&spec).unwrap();
    let tools = parse_tools(&tools_json()).unwrap();
    let plan = lm
        .plan(&Structure::Tools {
            tools,
            choice: ToolChoice::Auto,
            parallel: false,
        })
        .unwrap();
    let vocab = lm.model.vocab_size();
    let allowed = |c: &mut zagreus::structured::Constraint| {
        let mut logits = vec![0.0f32; vocab];
        c.mask(&mut logits).unwrap();
        logits.iter().filter(|l| l.is_finite()).count()
    };
    let feed = |c: &mut zagreus::structured::Constraint, text: &str| {
        for id in lm.tokenizer.encode_raw(text, false).unwrap() {
            c.accept(id).unwrap();
        }
    };
    let mut c = Arc::clone(&plan).start();
    assert_eq!(allowed(&mut c), vocab, "free text before a call");
    feed(&mut c, "Certo, controllo. ");
    assert_eq!(allowed(&mut c), vocab);
    feed(&mut c, "<tool_call>\n{\"name\": \"");
    let n = allowed(&mut c);
    assert!(n > 0 && n < vocab / 4, "{n} tokens allowed inside the call's name");
    feed(
        &mut c,
        "meteo\", \"arguments\": {\"citta\": \"Roma\", \"unita\": \"celsius\"}}\n</tool_call>",
    );
    // One call (parallel_tool_calls false): only an end token may follow.
    assert!(c.is_done());
    assert!(allowed(&mut c) <= lm.stop_ids.len());
}

#[test]
fn a_real_model_calls_a_tool_and_answers_with_its_result() {
    let m = asset("SmolLM2-135M-Instruct.Q4_1.gguf");
    let t = nesso_template();
    let user = json!({"role": "user", "content": "What is the weather in Rome?"});
    let first = batch(
        &m,
        Some(&t),
        &[
            json!({"messages": [user], "tools": tools_json(), "tool_choice": "required", "parallel_tool_calls": false, "temperature": 0}),
        ],
    );
    let c = &first[0]["choices"][0];
    assert_eq!(c["finish_reason"], "tool_calls", "{c}");
    let call = &c["message"]["tool_calls"][0];
    assert!(["meteo", "somma"].contains(&call["function"]["name"].as_str().unwrap()));
    // Second turn: the call and its result go back through the template.
    let messages = json!([user, c["message"],
        {"role": "tool", "tool_call_id": call["id"], "content": "{\"temperatura\": 21, \"cielo\": \"sereno\"}"}]);
    let second = batch(
        &m,
        Some(&t),
        &[
            json!({"messages": messages, "tools": tools_json(), "tool_choice": "none", "temperature": 0, "max_tokens": 60}),
        ],
    );
    let c2 = &second[0]["choices"][0];
    let answer = c2["message"]["content"].as_str().unwrap();
    assert!(
        !answer.trim().is_empty() && c2["message"].get("tool_calls").is_none(),
        "{c2}"
    );
    assert!(second[0]["usage"]["prompt_tokens"].as_u64() > first[0]["usage"]["prompt_tokens"].as_u64());
    // The model read the result: SmolLM2 repeats the temperature.
    assert!(answer.contains("21"), "{answer}");
}
