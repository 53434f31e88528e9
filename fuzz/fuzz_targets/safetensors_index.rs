//! `model.safetensors.index.json` on arbitrary text: every shard name it yields is one plain
//! path component (it is joined to the model's directory and to the hub cache).
#![no_main]

use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(names) = zagreus::model::weights::parse_index(text) {
        for n in names {
            let parts: Vec<Component> = Path::new(&n).components().collect();
            assert!(matches!(parts.as_slice(), [Component::Normal(_)]), "{n:?}");
        }
    }
});
