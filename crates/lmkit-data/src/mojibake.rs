//! Repair of mojibake: UTF-8 text that was decoded as Windows-1252 (or Latin-1) somewhere on its
//! way, such as `cafÃ©` for `café` or `ëŒ€í•œë¯¼êµ­` for `대한민국`. Each whitespace-separated word
//! whose characters all map back to single bytes is re-read as UTF-8; the word is replaced only
//! when those bytes are valid UTF-8 and hold a character above U+007F, so real Latin-1 words
//! (`café`, `naïve`: not valid UTF-8 as bytes) are left alone.

/// Windows-1252's characters for the bytes 0x80–0x9F (None: undefined, read as the C1 control).
const CP1252: [Option<char>; 32] = [
    Some('€'),
    None,
    Some('‚'),
    Some('ƒ'),
    Some('„'),
    Some('…'),
    Some('†'),
    Some('‡'),
    Some('ˆ'),
    Some('‰'),
    Some('Š'),
    Some('‹'),
    Some('Œ'),
    None,
    Some('Ž'),
    None,
    None,
    Some('‘'),
    Some('’'),
    Some('“'),
    Some('”'),
    Some('•'),
    Some('–'),
    Some('—'),
    Some('˜'),
    Some('™'),
    Some('š'),
    Some('›'),
    Some('œ'),
    None,
    Some('ž'),
    Some('Ÿ'),
];

fn byte_of(c: char) -> Option<u8> {
    let u = c as u32;
    if u < 0x80 || (0xA0..=0xFF).contains(&u) || (0x80..0xA0).contains(&u) {
        return Some(u as u8);
    }
    CP1252
        .iter()
        .position(|&x| x == Some(c))
        .map(|i| 0x80 + i as u8)
}

fn fix_word(w: &str) -> Option<String> {
    if w.is_ascii() {
        return None;
    }
    let bytes: Vec<u8> = w.chars().map(byte_of).collect::<Option<_>>()?;
    let s = String::from_utf8(bytes).ok()?;
    (s != w && !s.is_ascii()).then_some(s)
}

/// The text with mojibake words repaired, or None when none was found.
pub fn fix(text: &str) -> Option<String> {
    // Quick exit: mojibake of UTF-8 always holds a character from U+0080–U+00FF or a
    // Windows-1252 symbol.
    if !text
        .chars()
        .any(|c| ('\u{80}'..='\u{FF}').contains(&c) || CP1252.contains(&Some(c)))
    {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    let mut changed = false;
    let mut rest = text;
    while !rest.is_empty() {
        let ws = rest
            .find(|c: char| !c.is_whitespace())
            .unwrap_or(rest.len());
        out.push_str(&rest[..ws]);
        rest = &rest[ws..];
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let word = &rest[..end];
        match fix_word(word) {
            Some(f) => {
                out.push_str(&f);
                changed = true;
            }
            None => out.push_str(word),
        }
        rest = &rest[end..];
    }
    changed.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn garble(s: &str) -> String {
        // What a Windows-1252 decoder makes of UTF-8 bytes.
        s.bytes()
            .map(|b| match b {
                0x80..=0x9F => CP1252[(b - 0x80) as usize].unwrap_or(b as char),
                _ => b as char,
            })
            .collect()
    }

    #[test]
    fn repairs_utf8_read_as_windows_1252() {
        assert_eq!(garble("café"), "cafÃ©");
        for s in [
            "café au lait — “quoted”",
            "대한민국은 민주공화국이다.",
            "naïve résumé 123",
            "東京 ☃ €5",
        ] {
            assert_eq!(fix(&garble(s)).as_deref(), Some(s), "{s}");
        }
        for ok in ["café naïve", "plain ascii", "대한민국", "Ünïcödé ß"] {
            assert_eq!(fix(ok), None, "{ok}");
        }
    }
}
