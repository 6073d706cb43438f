//! Masking of personal data: e-mail addresses, phone numbers (international, North American and
//! Korean forms), IPv4 and IPv6 addresses, Korean resident registration numbers (주민등록번호, with
//! a valid birth date and sex digit) and payment card numbers (13–19 digits passing the Luhn
//! check). Each match becomes a replacement token (`<EMAIL>`, `<PHONE>`, `<IP>`, `<RRN>`,
//! `<CARD>`, or one token for all) and is counted by kind. Word boundaries are ASCII ones, so a
//! number directly followed by Hangul (`02-123-4567로`) is still found.

use regex::Regex;
use std::sync::LazyLock;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Email,
    Card,
    Rrn,
    Phone,
    Ip,
}

impl Kind {
    pub const ALL: [Kind; 5] = [Kind::Email, Kind::Card, Kind::Rrn, Kind::Phone, Kind::Ip];

    pub fn token(self) -> &'static str {
        match self {
            Kind::Email => "<EMAIL>",
            Kind::Card => "<CARD>",
            Kind::Rrn => "<RRN>",
            Kind::Phone => "<PHONE>",
            Kind::Ip => "<IP>",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Email => "email",
            Kind::Card => "card",
            Kind::Rrn => "rrn",
            Kind::Phone => "phone",
            Kind::Ip => "ip",
        }
    }
}

/// Which kinds to mask and with what.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PiiOptions {
    pub kinds: Vec<Kind>,
    /// One token for every kind instead of the per-kind tokens.
    pub replacement: Option<String>,
}

impl Default for PiiOptions {
    fn default() -> Self {
        PiiOptions {
            kinds: Kind::ALL.to_vec(),
            replacement: None,
        }
    }
}

static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)(?-u:\b)[a-z0-9][a-z0-9._%+-]{0,63}@(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,24}(?-u:\b)")
        .unwrap()
});
// 13–19 digits, optionally in groups separated by single spaces or dashes.
static CARD: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?-u:\b)\d(?:[ -]?\d){12,18}(?-u:\b)").unwrap());
static RRN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?-u:\b)(\d{6})\s?-\s?([1-8])(\d{6})(?-u:\b)").unwrap());
static PHONE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(concat!(
        // Korean: 010-1234-5678, 02-123-4567, 031 123 4567, +82 10-1234-5678
        r"(?:\+82[ -]?)?(?-u:\b)0?(?:1[016789]|2|[3-6][1-5]|70)[ -.)]?\d{3,4}[ -.]\d{4}(?-u:\b)",
        // International with a country code: +1 415 555 0100, +44 20 7946 0958
        r"|\+\d{1,3}(?:[ -.]?\(?\d{1,4}\)?){2,4}\d",
        // North American: (415) 555-0100, 415-555-0100, 415.555.0100
        r"|(?:\(\d{3}\)\s?|(?-u:\b)\d{3}[-.])\d{3}[-.]\d{4}(?-u:\b)",
    ))
    .unwrap()
});
static IPV4: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?-u:\b)(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?-u:\b)").unwrap()
});
static IPV6: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)(?-u:\b)(?:[0-9a-f]{1,4}:){7}[0-9a-f]{1,4}(?-u:\b)|(?i)(?-u:\b)(?:[0-9a-f]{1,4}:){1,6}:(?:[0-9a-f]{1,4}:){0,5}[0-9a-f]{1,4}(?-u:\b)").unwrap()
});

/// The Luhn checksum of a digit string.
pub fn luhn(digits: &[u8]) -> bool {
    let mut sum = 0u32;
    for (i, &d) in digits.iter().rev().enumerate() {
        let mut v = (d - b'0') as u32;
        if i % 2 == 1 {
            v *= 2;
            if v > 9 {
                v -= 9;
            }
        }
        sum += v;
    }
    digits.len() >= 13 && sum.is_multiple_of(10)
}

/// A resident registration number has a real birth date (YYMMDD) and a sex/century digit 1–8.
fn valid_rrn(date: &str) -> bool {
    let b = date.as_bytes();
    let month = (b[2] - b'0') * 10 + (b[3] - b'0');
    let day = (b[4] - b'0') * 10 + (b[5] - b'0');
    (1..=12).contains(&month) && (1..=31).contains(&day)
}

fn find(kind: Kind, text: &str) -> Vec<(usize, usize)> {
    let spans = |re: &Regex| -> Vec<(usize, usize)> {
        re.find_iter(text).map(|m| (m.start(), m.end())).collect()
    };
    match kind {
        Kind::Email => spans(&EMAIL),
        Kind::Card => CARD
            .find_iter(text)
            .filter(|m| {
                let digits: Vec<u8> = m.as_str().bytes().filter(u8::is_ascii_digit).collect();
                luhn(&digits)
            })
            .map(|m| (m.start(), m.end()))
            .collect(),
        Kind::Rrn => RRN
            .captures_iter(text)
            .filter(|c| valid_rrn(&c[1]))
            .map(|c| {
                let m = c.get(0).unwrap();
                (m.start(), m.end())
            })
            .collect(),
        Kind::Phone => spans(&PHONE),
        Kind::Ip => {
            // Not a piece of a longer dotted number (1.2.4.5.6.8, section numbers).
            let mut v: Vec<(usize, usize)> = spans(&IPV4)
                .into_iter()
                .filter(|&(s, e)| {
                    let after = &text.as_bytes()[e..];
                    let dotted_after =
                        after.len() >= 2 && after[0] == b'.' && after[1].is_ascii_digit();
                    !(text[..s].ends_with('.') || dotted_after)
                })
                .collect();
            v.extend(spans(&IPV6));
            v
        }
    }
}

/// Masks `text`; returns the new text (None when nothing matched) and the count of each kind
/// masked. Kinds are tried in order (e-mail, card, RRN, phone, IP); a span already masked is not
/// matched again.
pub fn mask(text: &str, o: &PiiOptions) -> (Option<String>, [u32; 5]) {
    let mut counts = [0u32; 5];
    let mut cur: Option<String> = None;
    for kind in Kind::ALL {
        if !o.kinds.contains(&kind) {
            continue;
        }
        let src = cur.as_deref().unwrap_or(text);
        let spans = find(kind, src);
        // Spans inside an earlier token (`<EMAIL>`...) cannot occur: tokens hold no digits or @.
        if spans.is_empty() {
            continue;
        }
        let token = o.replacement.as_deref().unwrap_or(kind.token());
        let mut out = String::with_capacity(src.len());
        let mut last = 0;
        for (s, e) in spans {
            if s < last {
                continue;
            }
            out.push_str(&src[last..s]);
            out.push_str(token);
            last = e;
            counts[kind as usize] += 1;
        }
        out.push_str(&src[last..]);
        cur = Some(out);
    }
    (cur, counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(t: &str) -> String {
        mask(t, &PiiOptions::default())
            .0
            .unwrap_or_else(|| t.to_string())
    }

    #[test]
    fn masks_planted_personal_data_in_english_and_korean() {
        assert_eq!(
            m("Write to jane.doe+news@example.co.uk or call (415) 555-0100."),
            "Write to <EMAIL> or call <PHONE>."
        );
        assert_eq!(
            m("휴대폰 010-1234-5678, 사무실 02-123-4567로 연락"),
            "휴대폰 <PHONE>, 사무실 <PHONE>로 연락"
        );
        assert_eq!(
            m("주민등록번호 900101-1234567 확인"),
            "주민등록번호 <RRN> 확인"
        );
        // Not a date: left alone.
        assert_eq!(m("번호 901301-1234567"), "번호 901301-1234567");
        assert_eq!(m("card 4111 1111 1111 1111 ok"), "card <CARD> ok");
        // Fails the Luhn check: an order number, not a card.
        assert_eq!(m("order 4111 1111 1111 1112"), "order 4111 1111 1111 1112");
        assert_eq!(
            m("from 192.168.0.1 and 2001:db8::8a2e:370:7334"),
            "from <IP> and <IP>"
        );
        assert_eq!(m("version 1.2.3 in 2024"), "version 1.2.3 in 2024");
        assert_eq!(m("쟁점1.2.4.5.6.8비용"), "쟁점1.2.4.5.6.8비용");
        assert_eq!(m("+44 20 7946 0958"), "<PHONE>");
        let (out, counts) = mask(
            "a@b.io 010-1111-2222 8.8.8.8",
            &PiiOptions {
                kinds: vec![Kind::Email, Kind::Ip],
                replacement: Some("[PII]".into()),
            },
        );
        assert_eq!(out.unwrap(), "[PII] 010-1111-2222 [PII]");
        assert_eq!(
            (counts[Kind::Email as usize], counts[Kind::Ip as usize]),
            (1, 1)
        );
    }

    #[test]
    fn luhn_check() {
        assert!(luhn(b"4111111111111111"));
        assert!(luhn(b"5500005555555559"));
        assert!(!luhn(b"4111111111111112"));
        assert!(!luhn(b"0000"));
    }
}
