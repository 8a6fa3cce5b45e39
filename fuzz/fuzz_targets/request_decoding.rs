//! Any bytes as a request body to every built-in handler's decoding, under each content type
//! they read (JSON, `.npy`, raw float32, multipart and urlencoded forms, images, text), and as
//! an Open Inference Protocol body: instances or a client error, never a panic. Image bodies
//! that pass the header check are also decoded to pixels, as a worker would.

#![no_main]

use libfuzzer_sys::fuzz_target;
use torchfn_engine::handler::{
    decode_rgb, tensors, ClassifierHandler, Handler, ImageClassifier, Input, Request, TensorHandler,
};

const TYPES: &[Option<&str>] = &[
    None,
    Some("application/json"),
    Some("application/x-npy"),
    Some("application/octet-stream"),
    Some("multipart/form-data; boundary=XyZ"),
    Some("application/x-www-form-urlencoded"),
    Some("image/png"),
    Some("text/plain"),
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let request = Request {
        body,
        content_type: TYPES[selector as usize % TYPES.len()],
        tensor_shape: (selector & 0x80 != 0).then_some("2,2"),
    };
    let handlers: [&dyn Handler; 3] = [
        &TensorHandler,
        &ClassifierHandler::without_labels(),
        &ImageClassifier::without_labels(),
    ];
    for h in handlers {
        if let Ok(decoded) = h.decode(&request) {
            for inst in decoded.instances {
                if let Input::Bytes(bytes) = &inst.input {
                    let _ = decode_rgb(bytes);
                }
            }
        }
    }
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) {
        if let Ok(inputs) = tensors::parse_v2_inputs(&json) {
            let _ = tensors::rows(inputs);
        }
    }
});
