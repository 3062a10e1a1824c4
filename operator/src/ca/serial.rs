//! Certificate serial numbers: random, positive, 126 bits of entropy
//! (CA/Browser Forum asks for at least 64).

use rand::RngCore;
use rcgen::SerialNumber;

pub fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    // Clear the sign bit (DER INTEGERs are signed) and set the next one, so
    // every serial has the same length and none starts with a zero byte.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_positive_sixteen_bytes_and_differ() {
        let a = random_serial().to_bytes();
        let b = random_serial().to_bytes();
        assert_eq!(a.len(), 16);
        assert!(a[0] & 0x80 == 0 && a[0] & 0x40 != 0);
        assert_ne!(a, b);
    }
}
