//! TorchServe's frontend–worker protocol ("OTF"), as `ts/protocol/otf_message_handler.py`
//! reads and writes it: big-endian `i32` lengths and codes, byte strings, lists closed by `-1`.
//!
//! Frontend → worker: a load message (`L`) once, then inference messages (`I`), each a batch
//! of requests. Worker → frontend: one reply per message: a code, a message and, for
//! inference, one entry per request of the batch.

use std::io::{self, Read};

/// Longest string or body the decoder accepts from a worker (a reply larger than this is a
/// broken worker, not an answer).
pub const MAX_FIELD: usize = 1 << 30;

/// What the load message (`L`) tells the worker.
#[derive(Debug, Clone)]
pub struct Load<'a> {
    pub model_name: &'a str,
    /// The unpacked archive's folder.
    pub model_path: &'a str,
    pub batch_size: i32,
    /// The manifest's handler (`handler.py`, `handler.py:fn`, `image_classifier`).
    pub handler: &'a str,
    /// The GPU index, or `None` for the CPU.
    pub gpu: Option<i32>,
    /// A request envelope (`json`, `kserve`, `kservev2`), or empty.
    pub envelope: &'a str,
    pub limit_max_image_pixels: bool,
}

/// One named input of a request (the body is one input named `body`; form fields and query
/// parameters are one each).
#[derive(Debug, Clone, PartialEq)]
pub struct Input {
    pub name: String,
    /// Empty when the input has none (query parameters).
    pub content_type: String,
    pub value: Vec<u8>,
}

/// One request of an inference batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub id: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub inputs: Vec<Input>,
}

/// The worker's answer to one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub request_id: String,
    /// Set by the handler (`context.set_response_content_type`), else empty.
    pub content_type: String,
    pub status: i32,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// The worker's reply to a message: the batch's code and message, and a response per request
/// (none for a load).
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub code: i32,
    pub message: String,
    pub responses: Vec<Response>,
}

fn put_i32(out: &mut Vec<u8>, v: i32) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    // Lengths past i32 cannot be sent; the caller bounds request sizes far below that.
    put_i32(out, i32::try_from(b.len()).unwrap_or(i32::MAX));
    out.extend_from_slice(b);
}

/// The load message.
pub fn encode_load(load: &Load<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + load.model_path.len());
    out.push(b'L');
    put_bytes(&mut out, load.model_name.as_bytes());
    put_bytes(&mut out, load.model_path.as_bytes());
    put_i32(&mut out, load.batch_size);
    put_bytes(&mut out, load.handler.as_bytes());
    put_i32(&mut out, load.gpu.unwrap_or(-1));
    put_bytes(&mut out, load.envelope.as_bytes());
    out.push(u8::from(load.limit_max_image_pixels));
    out
}

/// An inference message for a batch of requests.
pub fn encode_infer(batch: &[Request]) -> Vec<u8> {
    let size: usize = batch
        .iter()
        .map(|r| {
            32 + r.id.len()
                + r.headers
                    .iter()
                    .map(|(k, v)| 8 + k.len() + v.len())
                    .sum::<usize>()
                + r.inputs
                    .iter()
                    .map(|i| 12 + i.name.len() + i.content_type.len() + i.value.len())
                    .sum::<usize>()
        })
        .sum();
    let mut out = Vec::with_capacity(8 + size);
    out.push(b'I');
    for r in batch {
        put_bytes(&mut out, r.id.as_bytes());
        for (k, v) in &r.headers {
            put_bytes(&mut out, k.as_bytes());
            put_bytes(&mut out, v);
        }
        put_i32(&mut out, -1);
        for i in &r.inputs {
            put_bytes(&mut out, i.name.as_bytes());
            put_bytes(&mut out, i.content_type.as_bytes());
            put_bytes(&mut out, &i.value);
        }
        put_i32(&mut out, -1);
    }
    put_i32(&mut out, -1);
    out
}

fn get_i32(r: &mut impl Read) -> io::Result<i32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(i32::from_be_bytes(b))
}

fn get_bytes_of(r: &mut impl Read, len: i32) -> io::Result<Vec<u8>> {
    let len = usize::try_from(len)
        .ok()
        .filter(|&l| l <= MAX_FIELD)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the worker sent a field of length {len}"),
            )
        })?;
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

fn get_bytes(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let len = get_i32(r)?;
    get_bytes_of(r, len)
}

fn get_string(r: &mut impl Read) -> io::Result<String> {
    Ok(String::from_utf8_lossy(&get_bytes(r)?).into_owned())
}

/// Reads one reply (to a load or an inference message).
pub fn read_reply(r: &mut impl Read) -> io::Result<Reply> {
    let code = get_i32(r)?;
    let message = get_string(r)?;
    let mut responses = Vec::new();
    loop {
        let len = get_i32(r)?;
        if len == -1 {
            break;
        }
        let request_id = String::from_utf8_lossy(&get_bytes_of(r, len)?).into_owned();
        let content_type = get_string(r)?;
        let status = get_i32(r)?;
        let reason = get_string(r)?;
        let n = get_i32(r)?;
        let n = usize::try_from(n).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the worker sent {n} headers"),
            )
        })?;
        let mut headers = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            headers.push((get_string(r)?, get_string(r)?));
        }
        let body = get_bytes(r)?;
        responses.push(Response {
            request_id,
            content_type,
            status,
            reason,
            headers,
            body,
        });
    }
    Ok(Reply {
        code,
        message,
        responses,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// One response of a reply: request id, content type, status, headers, body.
    type Entry<'a> = (&'a str, &'a str, i32, &'a [(&'a str, &'a str)], &'a [u8]);

    /// A reply as the worker's `create_predict_response` writes it.
    fn worker_reply(code: i32, message: &str, entries: &[Entry<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        put_i32(&mut out, code);
        put_bytes(&mut out, message.as_bytes());
        for (id, ct, status, headers, body) in entries {
            put_bytes(&mut out, id.as_bytes());
            put_bytes(&mut out, ct.as_bytes());
            put_i32(&mut out, *status);
            put_bytes(&mut out, b"");
            put_i32(&mut out, headers.len() as i32);
            for (k, v) in *headers {
                put_bytes(&mut out, k.as_bytes());
                put_bytes(&mut out, v.as_bytes());
            }
            put_bytes(&mut out, body);
        }
        put_i32(&mut out, -1);
        out
    }

    #[test]
    fn a_load_reply_has_no_responses() {
        let bytes = worker_reply(200, "loaded model m", &[]);
        let reply = read_reply(&mut bytes.as_slice()).unwrap();
        assert_eq!(reply.code, 200);
        assert_eq!(reply.message, "loaded model m");
        assert!(reply.responses.is_empty());
    }

    #[test]
    fn an_inference_reply_keeps_each_requests_answer() {
        let bytes = worker_reply(
            200,
            "Prediction success",
            &[
                ("a", "", 200, &[], b"{\n  \"x\": 1\n}"),
                ("b", "text/plain", 201, &[("k", "v")], b"hi"),
            ],
        );
        let reply = read_reply(&mut bytes.as_slice()).unwrap();
        assert_eq!(reply.responses.len(), 2);
        assert_eq!(reply.responses[0].request_id, "a");
        assert_eq!(reply.responses[0].body, b"{\n  \"x\": 1\n}");
        assert_eq!(reply.responses[1].content_type, "text/plain");
        assert_eq!(reply.responses[1].status, 201);
        assert_eq!(reply.responses[1].headers, vec![("k".into(), "v".into())]);
    }

    #[test]
    fn a_cut_or_hostile_reply_is_an_error_not_a_panic() {
        let bytes = worker_reply(200, "ok", &[("a", "", 200, &[], b"body")]);
        for cut in 0..bytes.len() {
            assert!(read_reply(&mut &bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut huge = Vec::new();
        put_i32(&mut huge, 200);
        put_i32(&mut huge, i32::MAX);
        assert!(read_reply(&mut huge.as_slice()).is_err());
        let mut negative = Vec::new();
        put_i32(&mut negative, 200);
        put_i32(&mut negative, -7);
        assert!(read_reply(&mut negative.as_slice()).is_err());
    }

    #[test]
    fn messages_are_framed_as_the_worker_reads_them() {
        let load = encode_load(&Load {
            model_name: "m",
            model_path: "/p",
            batch_size: 4,
            handler: "handler.py",
            gpu: None,
            envelope: "",
            limit_max_image_pixels: true,
        });
        let mut expect = vec![b'L'];
        put_bytes(&mut expect, b"m");
        put_bytes(&mut expect, b"/p");
        put_i32(&mut expect, 4);
        put_bytes(&mut expect, b"handler.py");
        put_i32(&mut expect, -1);
        put_bytes(&mut expect, b"");
        expect.push(1);
        assert_eq!(load, expect);

        let infer = encode_infer(&[Request {
            id: "r1".into(),
            headers: vec![("h".into(), b"v".to_vec())],
            inputs: vec![Input {
                name: "body".into(),
                content_type: "application/json".into(),
                value: b"[1]".to_vec(),
            }],
        }]);
        let mut expect = vec![b'I'];
        put_bytes(&mut expect, b"r1");
        put_bytes(&mut expect, b"h");
        put_bytes(&mut expect, b"v");
        put_i32(&mut expect, -1);
        put_bytes(&mut expect, b"body");
        put_bytes(&mut expect, b"application/json");
        put_bytes(&mut expect, b"[1]");
        put_i32(&mut expect, -1);
        put_i32(&mut expect, -1);
        assert_eq!(infer, expect);
    }
}
