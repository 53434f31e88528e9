//! Chat templates: arbitrary template text compiled and rendered over a conversation with a
//! system prompt, tools and a tool call, under a small step (fuel), memory and time budget.
//! Whatever the template does, the result is text or an error.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use zagreus::budget::Limits;
use zagreus::template::{ChatTemplate, Message, TemplateTokens};

const LIMITS: Limits = Limits {
    memory: 8 << 20,
    time: Duration::from_secs(5),
};

struct Fixed {
    messages: Vec<Message>,
    tools: Vec<serde_json::Value>,
    tokens: TemplateTokens,
}

fn fixed() -> &'static Fixed {
    static F: OnceLock<Fixed> = OnceLock::new();
    F.get_or_init(|| {
        let mut call = Message::new("assistant", "");
        call.extra.insert(
            "tool_calls".into(),
            serde_json::json!([{"type": "function", "function": {"name": "meteo", "arguments": {"città": "Roma"}}}]),
        );
        Fixed {
            messages: vec![
                Message::new("system", "Sei un assistente utile."),
                Message::new("user", "Che tempo fa a Roma? 😀"),
                call,
                Message::new("tool", "{\"gradi\": 21}"),
            ],
            tools: vec![serde_json::json!({"type": "function", "function": {"name": "meteo", "parameters": {}}})],
            tokens: TemplateTokens {
                bos_token: Some("<s>".into()),
                eos_token: Some("</s>".into()),
                ..TemplateTokens::default()
            },
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(t) = ChatTemplate::with_fuel(src, "fuzz.jinja", 50_000) else {
        return;
    };
    let f = fixed();
    let _ = t.render_within(&f.messages, Some(&f.tools), true, &f.tokens, LIMITS);
});
