//! The text (and URL) of a JSON line whose object is flat — string, number, `true`, `false` and
//! `null` values, as corpus lines nearly always are — read in one pass without `serde_json`: the
//! text is unescaped once, found eight bytes at a time, and its UTF-8 checked with SIMD. Anything
//! else (a nested value, an escaped key, bad JSON, a missing or non-string text) is left to the
//! full parser, which also names what is wrong: this path only ever agrees with it.

use crate::swar::{is_json_special, json_special};

/// Where the scan is in a line.
struct Scan<'a> {
    b: &'a [u8],
    i: usize,
}

impl Scan<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    /// Passes over JSON whitespace.
    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        let here = self.peek() == Some(c);
        self.i += usize::from(here);
        here
    }

    /// From after an opening quote to the next byte that is a quote, a backslash or a control
    /// (returned with its place), eight bytes at a time.
    fn next_special(&mut self) -> Option<u8> {
        self.i = crate::swar::find(self.b, self.i, json_special, is_json_special);
        self.peek()
    }

    /// A string's raw bytes (between the quotes) when it has no escapes; `None` otherwise.
    fn plain_string(&mut self) -> Option<&[u8]> {
        if !self.eat(b'"') {
            return None;
        }
        let start = self.i;
        match self.next_special()? {
            b'"' => {
                self.i += 1;
                Some(&self.b[start..self.i - 1])
            }
            _ => None,
        }
    }

    /// A string, unescaped into `out` when one is given (cleared first) or passed over; `None`
    /// where the full parser would fail (bad escapes, lone surrogates, controls).
    fn string(&mut self, mut out: Option<&mut Vec<u8>>) -> Option<()> {
        if let Some(o) = out.as_deref_mut() {
            o.clear();
        }
        if !self.eat(b'"') {
            return None;
        }
        let mut copied = self.i;
        loop {
            let c = self.next_special()?;
            if let Some(o) = out.as_deref_mut() {
                o.extend_from_slice(&self.b[copied..self.i]);
            }
            match c {
                b'"' => {
                    self.i += 1;
                    return Some(());
                }
                b'\\' => {
                    let e = self.b.get(self.i + 1).copied()?;
                    self.i += 2;
                    let mut utf8 = [0; 4];
                    let unescaped: &[u8] = match e {
                        b'"' => b"\"",
                        b'\\' => b"\\",
                        b'/' => b"/",
                        b'b' => b"\x08",
                        b'f' => b"\x0C",
                        b'n' => b"\n",
                        b'r' => b"\r",
                        b't' => b"\t",
                        b'u' => self.unicode_escape()?.encode_utf8(&mut utf8).as_bytes(),
                        _ => return None,
                    };
                    if let Some(o) = out.as_deref_mut() {
                        o.extend_from_slice(unescaped);
                    }
                    copied = self.i;
                }
                _ => return None,
            }
        }
    }

    /// A string's text, unescaped through `scratch`; `None` also where it is not UTF-8.
    fn text(&mut self, scratch: &mut Vec<u8>) -> Option<String> {
        self.string(Some(scratch))?;
        simdutf8::basic::from_utf8(scratch).ok().map(str::to_owned)
    }

    /// The character of a `\u` escape (the `\u` read), a surrogate pair taken whole.
    fn unicode_escape(&mut self) -> Option<char> {
        let hi = self.hex4()?;
        if !(0xD800..0xDC00).contains(&hi) {
            return char::from_u32(hi); // a lone low surrogate gives None
        }
        if self.b.get(self.i..self.i + 2) != Some(b"\\u") {
            return None;
        }
        self.i += 2;
        let lo = self.hex4()?;
        if !(0xDC00..0xE000).contains(&lo) {
            return None;
        }
        char::from_u32(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00))
    }

    fn hex4(&mut self) -> Option<u32> {
        let digits = self.b.get(self.i..self.i + 4)?;
        let mut v = 0;
        for &d in digits {
            v = v << 4 | char::from(d).to_digit(16)?;
        }
        self.i += 4;
        Some(v)
    }

    /// A number, `true`, `false` or `null` passed over (JSON's grammar for numbers exactly).
    fn skip_scalar(&mut self) -> Option<()> {
        for word in [&b"true"[..], b"false", b"null"] {
            if self.b[self.i..].starts_with(word) {
                self.i += word.len();
                return Some(());
            }
        }
        self.eat(b'-');
        let digits = |s: &mut Self| {
            let start = s.i;
            while s.peek().is_some_and(|c| c.is_ascii_digit()) {
                s.i += 1;
            }
            s.i - start
        };
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                digits(self);
            }
            _ => return None,
        }
        if self.eat(b'.') && digits(self) == 0 {
            return None;
        }
        if self.eat(b'e') || self.eat(b'E') {
            if !self.eat(b'+') {
                self.eat(b'-');
            }
            if digits(self) == 0 {
                return None;
            }
        }
        // A number runs into what follows it only as bad JSON.
        match self.peek() {
            None | Some(b' ' | b'\t' | b'\n' | b'\r' | b',' | b'}') => Some(()),
            _ => None,
        }
    }
}

/// The text field's value and the URL field's (when a string) of a flat JSON object; `None`
/// for anything this path does not read (then the full parser does).
pub(crate) fn text_and_url(
    line: &[u8],
    field: &str,
    url_field: Option<&str>,
) -> Option<(String, Option<String>)> {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    SCRATCH.with(|scratch| {
        let scratch = &mut scratch.borrow_mut();
        let mut s = Scan { b: line, i: 0 };
        let (mut text, mut url) = (None, None);
        s.ws();
        if !s.eat(b'{') {
            return None;
        }
        s.ws();
        if !s.eat(b'}') {
            loop {
                let key = s.plain_string()?;
                // serde_json checks a key's UTF-8; the field names are UTF-8.
                std::str::from_utf8(key).ok()?;
                let is_text = key == field.as_bytes();
                let is_url = Some(key) == url_field.map(str::as_bytes);
                s.ws();
                if !s.eat(b':') {
                    return None;
                }
                s.ws();
                let quoted = s.peek() == Some(b'"');
                if is_text {
                    // A text that is not a string: the full parser says which type it is.
                    text = Some(s.text(scratch)?);
                } else if is_url && quoted {
                    url = Some(s.text(scratch)?);
                } else if is_url {
                    // Read as a JSON value there (a number out of f64's range is an error).
                    return None;
                } else if quoted {
                    s.string(None)?;
                } else {
                    s.skip_scalar()?;
                }
                s.ws();
                if s.eat(b',') {
                    s.ws();
                    continue;
                }
                if !s.eat(b'}') {
                    return None;
                }
                break;
            }
        }
        s.ws();
        (s.i == line.len()).then_some(())?;
        text.map(|t| (t, url))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lmkit_core::rng::Random;

    /// Random lines — flat and nested objects, every escape, bad numbers, controls, invalid UTF-8,
    /// surrogates, stray commas — read here agree with `serde_json` wherever this path answers,
    /// and it answers for most well-formed flat lines.
    #[test]
    fn agrees_with_serde_json() {
        let keys = [
            "\"text\"",
            "\"id\"",
            "\"url\"",
            "\"te\\u0078t\"",
            "\"\"",
            "\"t\\\"x\"",
        ];
        let string_parts: [&[u8]; 22] = [
            b"abc",
            b" ",
            b"\\n",
            b"\\\"",
            b"\\\\",
            b"\\/",
            b"\\b\\f\\r\\t",
            b"\\u00e9",
            b"\\u00E9",
            b"\\ud83d\\ude00",
            b"\\ud800",
            b"\\udc00",
            b"\\ud83dx",
            b"\\x",
            b"\\u12",
            "가나다".as_bytes(),
            "“q”".as_bytes(),
            b"\x01",
            b"\xff",
            b"\xe2\x80",
            b"0123456789abcdefghij",
            b"\t",
        ];
        let scalars = [
            "0",
            "-0",
            "12",
            "01",
            "1.",
            "1.5",
            "-2.5e10",
            "1E+3",
            "1e-",
            "-",
            "true",
            "false",
            "null",
            "nul",
            "truex",
            "1e400",
            "-1e-400",
            "123456789012345678901234567890",
            "{}",
            "{\"a\": [1, {\"b\": null}]}",
            "[1, 2]",
            "[]",
        ];
        let mut rng = lmkit_core::rng::SplitMix64::new(17);
        let mut pick = |n: usize| (rng.next_u64() % n as u64) as usize;
        let (mut answered, mut flat_ok) = (0, 0);
        for round in 0..40_000 {
            let mut line: Vec<u8> = Vec::new();
            let ws = [&b""[..], b" ", b"\t", b"  \r\n"];
            line.extend_from_slice(ws[pick(4)]);
            line.push(b'{');
            let fields = pick(4);
            for f in 0..fields {
                if f > 0 {
                    line.extend_from_slice(if pick(40) == 0 { b",," } else { b", " });
                }
                line.extend_from_slice(keys[pick(keys.len())].as_bytes());
                line.extend_from_slice(ws[pick(4)]);
                line.push(b':');
                line.extend_from_slice(ws[pick(4)]);
                if pick(3) > 0 {
                    line.push(b'"');
                    // Mostly clean strings, so that many lines are well-formed.
                    let clean = round % 2 == 0;
                    for _ in 0..pick(8) {
                        let part = string_parts[pick(if clean { 10 } else { 22 })];
                        line.extend_from_slice(part);
                    }
                    line.push(b'"');
                } else {
                    line.extend_from_slice(scalars[pick(scalars.len())].as_bytes());
                }
            }
            if pick(30) == 0 {
                line.push(b',');
            }
            if pick(50) > 0 {
                line.push(b'}');
            }
            line.extend_from_slice(ws[pick(4)]);
            let full = crate::ingest::json_text_parsed(&line, "text", Some("url"));
            flat_ok += usize::from(full.is_ok());
            if let Some(got) = text_and_url(&line, "text", Some("url")) {
                answered += 1;
                assert_eq!(Ok(got), full, "{}", String::from_utf8_lossy(&line));
            }
        }
        // Escaped keys, nested values and non-string URLs go to the full parser.
        assert!(answered * 5 > flat_ok, "{answered} of {flat_ok}");
        let typical = [
            (
                r#"{"id": "0", "text": "a\nb \"q\" \\"}"#,
                "a\nb \"q\" \\",
                None,
            ),
            (
                r#" {"text":"x","url":"http:\/\/a","n":-1.5e3,"ok":true,"z":null} "#,
                "x",
                Some("http://a"),
            ),
            (r#"{"text": "\u00e9\ud83d\ude00\t"}"#, "é😀\t", None),
            (
                r#"{"url": "", "text": "", "text": "last"}"#,
                "last",
                Some(""),
            ),
        ];
        for (line, text, url) in typical {
            let got = text_and_url(line.as_bytes(), "text", Some("url"));
            assert_eq!(got, Some((text.into(), url.map(String::from))), "{line}");
        }
    }
}
