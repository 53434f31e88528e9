//! The validation of values a hub hands out (commit shas, ETags, revisions, file names): whatever
//! it accepts must stay a harmless path below the directory it is joined to.
#![no_main]

use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;
use zagreus::hub::names;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let below = |p: &str| {
        Path::new(p).components().all(|c| matches!(c, Component::Normal(_))) && !p.contains('\0') && !p.contains('\\')
    };
    if let Ok(rev) = names::revision(s) {
        assert!(below(rev), "revision {rev:?}");
    }
    if let Ok(name) = names::file_name(s, "fuzz") {
        assert!(
            below(name) && Path::new(name).components().count() == 1,
            "file {name:?}"
        );
    }
    if let Ok(c) = names::commit(s, "fuzz") {
        assert!(c.len() == 40 && below(&c));
    }
    if let Ok(d) = names::etag(s) {
        let n = d.name();
        assert!(
            (n.len() == 40 || n.len() == 64) && n.bytes().all(|b| b.is_ascii_hexdigit()),
            "{n:?}"
        );
    }
    let seg = names::url_segment(s);
    assert!(!seg.contains('/') && !seg.contains('?') && !seg.contains('#'));
});
