//! Chat templates rendered with minijinja exactly as transformers renders them with jinja2:
//! `trim_blocks` and `lstrip_blocks` on, Python string and dict methods, a `tojson` that writes
//! what Python's `json.dumps` writes, `raise_exception` and `strftime_now`.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use minijinja::value::{Kwargs, Rest, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::budget::{self, Exceeded, Limits};

/// Steps (minijinja instructions) one rendering may take. Real templates take a few hundred per
/// message; a template that loops without end runs out here in a second or two.
pub const TEMPLATE_FUEL: u64 = 20_000_000;
/// What one rendering may hold in memory and how long it may run, whatever the template does
/// (strings that double at every step exhaust memory long before the fuel runs out).
pub const TEMPLATE_LIMITS: Limits = Limits {
    memory: 512 << 20,
    time: Duration::from_secs(20),
};

/// A built-in ChatML template for models that ship none.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// One chat message. Extra fields (`tool_calls`, `name`, ...) pass through to the template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Self {
            role: role.to_string(),
            content: content.into(),
            extra: serde_json::Map::new(),
        }
    }
}

/// Special-token strings a template may refer to (`bos_token`, `eos_token`, ...).
#[derive(Debug, Clone, Default)]
pub struct TemplateTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
}

pub struct ChatTemplate {
    env: Arc<Environment<'static>>,
    source: String,
    origin: String,
    /// Set when a rendering was stopped for exceeding its budget: the template is not run again.
    refused: Mutex<Option<String>>,
    fuel: u64,
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles a template; `origin` names where it came from in error messages.
    pub fn new(source: impl Into<String>, origin: impl Into<String>) -> Result<Self> {
        Self::with_fuel(source, origin, TEMPLATE_FUEL)
    }

    /// [`Self::new`] with another step limit (fuzzing uses a small one).
    pub fn with_fuel(source: impl Into<String>, origin: impl Into<String>, fuel: u64) -> Result<Self> {
        let source = source.into();
        let origin = origin.into();
        if source.len() as u64 > crate::bounded::TEMPLATE_LIMIT {
            bail!(
                "the chat template from {origin} is {} bytes, more than the {} zagreus accepts",
                source.len(),
                crate::bounded::size_name(crate::bounded::TEMPLATE_LIMIT)
            );
        }
        let mut env = Environment::new();
        env.set_fuel(Some(fuel));
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.clone())
            .map_err(|e| anyhow!("the chat template from {origin} does not compile: {}", one_line(&e)))?;
        Ok(Self {
            env: Arc::new(env),
            source,
            origin,
            refused: Mutex::new(None),
            fuel,
        })
    }

    /// Reads and compiles a template file (`--chat-template`, `chat_template.jinja`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let source = crate::bounded::read_text(path, crate::bounded::TEMPLATE_LIMIT, "the chat template")?;
        Self::new(source, path.display().to_string())
    }

    pub fn chatml() -> Self {
        Self::new(CHATML, "the built-in ChatML template").expect("the built-in template compiles")
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Renders `messages` as transformers' `apply_chat_template(..., tokenize=False)` would, within
    /// its fuel ([`TEMPLATE_FUEL`] steps) and [`TEMPLATE_LIMITS`].
    pub fn render<M: Serialize>(
        &self,
        messages: &[M],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
        tokens: &TemplateTokens,
    ) -> Result<String> {
        self.render_within(messages, tools, add_generation_prompt, tokens, TEMPLATE_LIMITS)
    }

    /// [`Self::render`] under other limits (tests and fuzzing use smaller ones).
    pub fn render_within<M: Serialize>(
        &self,
        messages: &[M],
        tools: Option<&[serde_json::Value]>,
        add_generation_prompt: bool,
        tokens: &TemplateTokens,
        limits: Limits,
    ) -> Result<String> {
        if let Some(why) = self.refused.lock().map(|r| r.clone()).unwrap_or(None) {
            bail!("the chat template from {} was stopped before: {why}", self.origin);
        }
        let opt = |s: &Option<String>| s.as_deref().map(Value::from).unwrap_or(Value::from(()));
        let ctx = minijinja::context! {
            messages => Value::from_serialize(messages),
            tools => tools.map(Value::from_serialize).unwrap_or(Value::from(())),
            documents => Value::from(()),
            add_generation_prompt => add_generation_prompt,
            bos_token => opt(&tokens.bos_token),
            eos_token => opt(&tokens.eos_token),
            pad_token => opt(&tokens.pad_token),
            unk_token => opt(&tokens.unk_token),
        };
        let env = self.env.clone();
        let fuel = self.fuel;
        let rendered = budget::run(limits, move || {
            let tmpl = env.get_template(NAME).map_err(|e| one_line(&e))?;
            tmpl.render(ctx).map_err(|e| match e.kind() {
                ErrorKind::OutOfFuel => format!("it ran more than {fuel} steps (a loop that does not end?)"),
                _ => one_line(&e),
            })
        });
        match rendered {
            Ok(Ok(text)) => Ok(text),
            Ok(Err(msg)) => bail!("the chat template from {} failed: {msg}", self.origin),
            Err(e @ (Exceeded::Memory(_) | Exceeded::Time(_))) => {
                if let Ok(mut r) = self.refused.lock() {
                    *r = Some(e.to_string());
                }
                bail!("the chat template from {} was stopped: {e}", self.origin)
            }
            Err(e) => bail!("the chat template from {} failed: {e}", self.origin),
        }
    }
}

fn one_line(e: &Error) -> String {
    let mut s = e.to_string();
    if let Some(detail) = e.detail() {
        if !s.contains(detail) {
            s = format!("{s}: {detail}");
        }
    }
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("raise_exception: {message}"),
    ))
}

/// `strftime_now(format)`: the current UTC time formatted with the common strftime codes.
fn strftime_now(format: String) -> Result<Value, Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok(Value::from(strftime(secs, &format)))
}

/// Formats a Unix time (UTC) with `%d %m %Y %y %b %B %a %A %H %M %S %j %%`.
pub fn strftime(secs: i64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_mar = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_mar + 2) / 153;
    let day = doy_mar - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cumulative = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cumulative[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`.
fn tojson(value: Value, args: Rest<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let mut indent: Option<Value> = kwargs.get("indent")?;
    if indent.is_none() {
        indent = args.first().cloned();
    }
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) if v.kind() == ValueKind::Number => Some(" ".repeat(i64::try_from(v)?.max(0) as usize)),
        Some(v) => Some(v.as_str().unwrap_or_default().to_string()),
    };
    let separators: Option<Value> = kwargs.get("separators")?;
    let (item_sep, key_sep) = match separators {
        Some(s) if !s.is_none() => {
            let parts: Vec<String> = s
                .try_iter()?
                .map(|v| v.as_str().unwrap_or_default().to_string())
                .collect();
            match parts.as_slice() {
                [a, b] => (a.clone(), b.clone()),
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair",
                    ))
                }
            }
        }
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let style = JsonStyle {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    write_json(&value, &style, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

struct JsonStyle {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

fn write_json(v: &Value, style: &JsonStyle, level: usize, out: &mut String) -> Result<(), Error> {
    match v.kind() {
        ValueKind::Undefined => return Err(Error::new(ErrorKind::UndefinedError, "tojson of an undefined value")),
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if v.is_integer() {
                out.push_str(&v.to_string());
            } else {
                out.push_str(&python_float(f64::try_from(v.clone())?));
            }
        }
        ValueKind::String => write_json_string(v.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            write_container(out, style, level, '[', ']', &items, |item, out| {
                write_json(item, style, level + 1, out)
            })?;
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if style.sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            write_container(out, style, level, '{', '}', &keys, |key, out| {
                write_json_string(&key.to_string(), out);
                out.push_str(&style.key_sep);
                write_json(&v.get_item(key)?, style, level + 1, out)
            })?;
        }
        _ => write_json_string(&v.to_string(), out),
    }
    Ok(())
}

fn write_container(
    out: &mut String,
    style: &JsonStyle,
    level: usize,
    open: char,
    close: char,
    items: &[Value],
    mut each: impl FnMut(&Value, &mut String) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return Ok(());
    }
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(&style.item_sep);
        }
        if let Some(ind) = &style.indent {
            out.push('\n');
            out.push_str(&ind.repeat(level + 1));
        }
        each(item, out)?;
    }
    if let Some(ind) = &style.indent {
        out.push('\n');
        out.push_str(&ind.repeat(level));
    }
    out.push(close);
    Ok(())
}

/// A JSON string as Python's `json.dumps(ensure_ascii=False)` escapes it.
fn write_json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: shortest round-trip digits, scientific outside 1e-4 ≤ |x| < 1e16.
pub fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    if f == 0.0 {
        return if f.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    let sci = format!("{f:e}"); // e.g. "-1.5e-5"
    let (mantissa, exp) = sci.split_once('e').expect("`{:e}` always has an exponent");
    let exp: i32 = exp.parse().expect("exponent is an integer");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let n = digits.len() as i32;
        let body = if exp < 0 {
            format!("0.{}{}", "0".repeat((-exp - 1) as usize), digits)
        } else if exp + 1 >= n {
            format!("{}{}.0", digits, "0".repeat((exp + 1 - n) as usize))
        } else {
            format!("{}.{}", &digits[..(exp + 1) as usize], &digits[(exp + 1) as usize..])
        };
        format!("{sign}{body}")
    } else {
        let m = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{m}e{esign}{:02}", exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_float_repr() {
        for (f, want) in [
            (1.0, "1.0"),
            (0.5, "0.5"),
            (-2.25, "-2.25"),
            (1e16, "1e+16"),
            (1.5e-5, "1.5e-05"),
            (0.0001, "0.0001"),
            (123456.789, "123456.789"),
            (1e22, "1e+22"),
            (0.1, "0.1"),
            (9999999999999998.0, "9999999999999998.0"),
        ] {
            assert_eq!(python_float(f), want, "{f}");
        }
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = ChatTemplate::new("{{ x | tojson }}|{{ x | tojson(indent=2) }}", "test").unwrap();
        let env = &t.env;
        let x: serde_json::Value =
            serde_json::from_str(r#"{"b": 1, "a": [1.5, true, null, "è<>&'\"\n"], "e": {}}"#).unwrap();
        let out = env
            .get_template(NAME)
            .unwrap()
            .render(minijinja::context! { x => Value::from_serialize(&x) })
            .unwrap();
        assert_eq!(
            out,
            "{\"b\": 1, \"a\": [1.5, true, null, \"è<>&'\\\"\\n\"], \"e\": {}}|{\n  \"b\": 1,\n  \"a\": [\n    1.5,\n    true,\n    null,\n    \"è<>&'\\\"\\n\"\n  ],\n  \"e\": {}\n}"
        );
    }

    #[test]
    fn strftime_known_dates() {
        assert_eq!(
            strftime(0, "%d %b %Y %A %H:%M:%S %j"),
            "01 Jan 1970 Thursday 00:00:00 001"
        );
        // 2024-02-29 12:34:56 UTC, a leap day.
        assert_eq!(
            strftime(1_709_210_096, "%Y-%m-%d %a %B %y %j"),
            "2024-02-29 Thu February 24 060"
        );
    }

    #[test]
    fn raise_exception_and_compile_errors_are_reported() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "t.jinja").unwrap();
        let err = t
            .render::<Message>(&[], None, true, &TemplateTokens::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("roles must alternate") && err.contains("t.jinja"), "{err}");
        let err = ChatTemplate::new("{% for %}", "bad.jinja").err().unwrap().to_string();
        assert!(err.contains("bad.jinja"), "{err}");
    }
}
