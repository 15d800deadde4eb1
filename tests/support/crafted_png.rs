//! Crafted images for the tests of image limits, shared by the crates' tests through
//! `#[path = "…/tests/support/crafted_png.rs"] mod crafted_png;`.

/// `png` (a valid PNG) with its header rewritten to claim `w`×`h` pixels and its checksum
/// fixed: a decompression bomb's header, a few hundred bytes that would allocate gigabytes.
pub fn claiming(mut png: Vec<u8>, w: u32, h: u32) -> Vec<u8> {
    // signature (8), IHDR length (4), "IHDR" (4), width, height, …, CRC after 13 bytes
    png[16..20].copy_from_slice(&w.to_be_bytes());
    png[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

/// PNG's CRC-32 (ISO 3309, reflected, polynomial 0xEDB88320).
fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for b in data {
        c ^= *b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}
