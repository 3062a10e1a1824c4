//! PEM in and out. Certificates are kept as DER internally and re-encoded
//! when served, so what agents receive is normalised whatever the input
//! files looked like.

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("not valid PEM: {0}")]
    Malformed(String),
    #[error("contains no CERTIFICATE block")]
    Empty,
}

/// Every `CERTIFICATE` block in `text`, in order. Other block types (a key
/// pasted in by mistake, say) are skipped.
pub fn certificates(text: &str) -> Result<Vec<CertificateDer<'static>>, PemError> {
    CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::Malformed(e.to_string()))
}

/// Like [`certificates`], but at least one is required.
pub fn certificates_nonempty(text: &str) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let certs = certificates(text)?;
    if certs.is_empty() {
        return Err(PemError::Empty);
    }
    Ok(certs)
}

/// One PEM block with 64-column base64 lines.
pub fn encode(label: &str, der: &[u8]) -> String {
    let b64 = base64(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 2 * label.len() + 40);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

/// A certificate as PEM.
pub fn certificate(der: &[u8]) -> String {
    encode("CERTIFICATE", der)
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), expected);
        }
    }

    #[test]
    fn encoded_certificates_parse_back() {
        let der: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let text = format!("{}{}", certificate(&der), certificate(&der[..7]));
        let parsed = certificates(&text).unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].as_ref(), der.as_slice());
        assert_eq!(parsed[1].as_ref(), &der[..7]);
        assert!(matches!(certificates_nonempty(""), Err(PemError::Empty)));
    }
}
