//! The safetensors reader on arbitrary bytes: the header (offsets, shapes, dtypes checked
//! against the data), then every tensor read as the CPU engine reads it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use zagreus::model::cpu::source::Tensors;
use zagreus::model::weights::Weights;

fuzz_target!(|data: &[u8]| {
    let Ok(w) = Weights::from_bytes(data, "fuzz.safetensors") else {
        return;
    };
    let names: Vec<String> = w.names().into_iter().map(String::from).collect();
    for name in names {
        match Tensors::shape(&w, &name).as_deref() {
            Some([len]) => {
                let v = Tensors::vector(&w, &name, *len).expect("a 1-D tensor reads as a vector");
                assert_eq!(v.len(), *len);
            }
            // An empty tensor may have any other dimension: nothing to read.
            Some([rows, cols]) if *rows > 0 && *cols > 0 => {
                let m = Tensors::matrix(&w, &name, *rows, *cols).expect("a 2-D tensor reads as a matrix");
                let mut row = vec![0f32; *cols];
                for r in 0..m.rows() {
                    m.read(r, &mut row);
                }
                m.release(0, m.rows());
            }
            _ => {}
        }
    }
});
