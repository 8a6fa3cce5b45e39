//! SHA-256 digests as lowercase hex, and S3's base64 checksums turned into the same form.

use sha2::{Digest, Sha256};

pub(super) fn base64_to_hex(b64: &str) -> Option<String> {
    // A composite (multipart) checksum reads `<base64>-<parts>`: not a whole-object hash.
    if b64.contains('-') {
        return None;
    }
    let bytes = aws_smithy_types::base64::decode(b64).ok()?;
    (bytes.len() == 32).then(|| hex(&bytes))
}

pub(super) fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

pub(super) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_and_base64() {
        assert_eq!(hex(&[0x00, 0xab, 0xff]), "00abff");
        let digest = Sha256::digest(b"abc");
        let b64 = aws_smithy_types::base64::encode(digest);
        assert_eq!(
            base64_to_hex(&b64).as_deref(),
            Some(sha256_hex(b"abc").as_str())
        );
        assert_eq!(base64_to_hex(&format!("{b64}-3")), None);
    }
}
