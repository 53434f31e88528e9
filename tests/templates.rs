//! Chat templates render byte-identically to transformers' `apply_chat_template(tokenize=False)`
//! (expected strings recorded by scripts/make_fixtures.py with transformers and jinja2).

mod common;

use common::{fixtures, read_json};
use zagreus::template::{ChatTemplate, TemplateTokens, CHATML};

/// The special-token strings a recorded case was rendered with.
fn case_tokens(case: &serde_json::Value) -> TemplateTokens {
    TemplateTokens {
        bos_token: case["bos_token"].as_str().map(String::from),
        eos_token: case["eos_token"].as_str().map(String::from),
        ..Default::default()
    }
}

#[test]
fn family_templates_render_exactly_as_transformers() {
    let dir = fixtures().join("templates");
    let cases = read_json(&dir.join("rendered.json"));
    let cases = cases.as_array().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let mut failures = Vec::new();
    for case in cases {
        let name = case["template"].as_str().unwrap();
        seen.insert(name.to_string());
        let t = ChatTemplate::from_file(&dir.join(format!("{name}.jinja"))).unwrap();
        let messages = case["messages"].as_array().unwrap();
        let tools = case["tools"].as_array().map(|v| v.as_slice());
        let tokens = case_tokens(case);
        let got = t
            .render(
                messages,
                tools,
                case["add_generation_prompt"].as_bool().unwrap(),
                &tokens,
            )
            .unwrap();
        let want = case["expected"].as_str().unwrap();
        if got != want {
            failures.push(format!(
                "{name} / {}:\n--- want\n{want}\n--- got\n{got}",
                case["description"]
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    for name in [
        "open-zagreus",
        "nesso-instruct",
        "nesso-agentic",
        "smollm2",
        "chatml-builtin",
    ] {
        assert!(seen.contains(name), "no cases for {name}");
    }
}

#[test]
fn builtin_chatml_is_the_recorded_one() {
    let recorded = std::fs::read_to_string(fixtures().join("templates/chatml-builtin.jinja")).unwrap();
    assert_eq!(recorded.trim_end(), CHATML);
}

/// The tool cases again, as a request brings them: messages and tools through the OpenAI body
/// reader (`zagreus batch`, the server), tools through the tool parser; the rendering must not
/// change.
#[test]
fn tool_requests_render_exactly_as_transformers() {
    use zagreus::openai::{Endpoint, Input, Job};
    let dir = fixtures().join("templates");
    let cases = read_json(&dir.join("rendered.json"));
    let mut checked = 0;
    for case in cases.as_array().unwrap().iter().filter(|c| c["tools"].is_array()) {
        let name = case["template"].as_str().unwrap();
        let t = ChatTemplate::from_file(&dir.join(format!("{name}.jinja"))).unwrap();
        let body = serde_json::json!({"messages": case["messages"], "tools": case["tools"]});
        let job = Job::from_body(Endpoint::Chat, &body).unwrap();
        let Input::Chat(messages) = &job.inputs[0] else {
            panic!("a chat input");
        };
        let defs = zagreus::tools::template_values(&job.shape.tools);
        let tokens = case_tokens(case);
        let got = t
            .render(
                messages,
                Some(&defs),
                case["add_generation_prompt"].as_bool().unwrap(),
                &tokens,
            )
            .unwrap();
        assert_eq!(
            got,
            case["expected"].as_str().unwrap(),
            "{name} / {}",
            case["description"]
        );
        checked += 1;
    }
    assert!(checked >= 10, "{checked} tool cases");
}
