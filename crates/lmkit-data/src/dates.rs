//! Rewrites common English and Korean date forms as ISO 8601 `YYYY-MM-DD`.
//!
//! Handled: `2024년 8월 26일`, `2024. 8. 26.`, `2024/8/26`, `2024-8-26`, `August 26, 2024`,
//! `Aug. 26th 2024`, `26 August 2024`. Purely numeric day/month orders such as `08/26/2024` are
//! ambiguous between countries and are left alone, as are impossible dates (`2023년 2월 30일`).

use regex::{Captures, Regex};
use std::sync::OnceLock;

const MONTHS: &str = r"(Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)";

struct Patterns {
    korean: Regex,
    dotted: Regex,
    numeric: Regex,
    month_day_year: Regex,
    day_month_year: Regex,
}

fn patterns() -> &'static Patterns {
    static P: OnceLock<Patterns> = OnceLock::new();
    P.get_or_init(|| Patterns {
        korean: Regex::new(r"(\d{4})\s*년\s*(\d{1,2})\s*월\s*(\d{1,2})\s*일").expect("valid regex"),
        dotted: Regex::new(r"\b(\d{4})\.\s*(\d{1,2})\.\s*(\d{1,2})\b\.?").expect("valid regex"),
        numeric: Regex::new(r"\b(\d{4})[/-](\d{1,2})[/-](\d{1,2})\b").expect("valid regex"),
        month_day_year: Regex::new(&format!(
            r"(?i)\b{MONTHS}\.?\s+(\d{{1,2}})(?:st|nd|rd|th)?,?\s+(\d{{4}})\b"
        ))
        .expect("valid regex"),
        day_month_year: Regex::new(&format!(
            r"(?i)\b(\d{{1,2}})(?:st|nd|rd|th)?\s+(?:of\s+)?{MONTHS}\.?,?\s+(\d{{4}})\b"
        ))
        .expect("valid regex"),
    })
}

fn month_number(name: &str) -> Option<u32> {
    let n = name.to_ascii_lowercase();
    let idx = [
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ]
    .iter()
    .position(|m| n.starts_with(m))?;
    Some(idx as u32 + 1)
}

fn is_leap(y: u32) -> bool {
    (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400)
}

fn iso(y: u32, m: u32, d: u32) -> Option<String> {
    let days = [
        31,
        if is_leap(y) { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&m) || d == 0 || d > days[m as usize - 1] {
        return None;
    }
    Some(format!("{y:04}-{m:02}-{d:02}"))
}

/// Reads (year, month, day) out of a match.
type Ymd = dyn Fn(&Captures) -> Option<(u32, u32, u32)>;

fn num(c: &Captures, i: usize) -> u32 {
    c.get(i).and_then(|m| m.as_str().parse().ok()).unwrap_or(0)
}

/// `text` with every recognised date rewritten; the count of rewrites.
pub fn normalize_dates(text: &str) -> (String, usize) {
    let p = patterns();
    let mut count = 0;
    let mut out = text.to_string();
    let mut apply = |re: &Regex, ymd: &Ymd| {
        if !re.is_match(&out) {
            return;
        }
        out = re
            .replace_all(&out, |c: &Captures| {
                match ymd(c).and_then(|(y, m, d)| iso(y, m, d)) {
                    Some(s) => {
                        count += 1;
                        s
                    }
                    None => c[0].to_string(),
                }
            })
            .into_owned();
    };
    apply(&p.korean, &|c| Some((num(c, 1), num(c, 2), num(c, 3))));
    apply(&p.dotted, &|c| Some((num(c, 1), num(c, 2), num(c, 3))));
    apply(&p.numeric, &|c| Some((num(c, 1), num(c, 2), num(c, 3))));
    apply(&p.month_day_year, &|c| {
        Some((num(c, 3), month_number(&c[1])?, num(c, 2)))
    });
    apply(&p.day_month_year, &|c| {
        Some((num(c, 3), month_number(&c[2])?, num(c, 1)))
    });
    (out, count)
}

#[cfg(test)]
mod tests {
    use super::normalize_dates;

    #[test]
    fn korean_and_english_forms() {
        let cases = [
            ("2024년 8월 26일에 시행한다", "2024-08-26에 시행한다"),
            ("공포일: 2024. 8. 26.", "공포일: 2024-08-26"),
            ("on August 26, 2024 we", "on 2024-08-26 we"),
            ("Aug. 6th 2024", "2024-08-06"),
            ("the 26th of August, 2024", "the 2024-08-26"),
            ("26 Aug 2024", "2024-08-26"),
            ("2024/8/26 and 2024-08-26", "2024-08-26 and 2024-08-26"),
        ];
        for (input, want) in cases {
            assert_eq!(normalize_dates(input).0, want, "{input}");
        }
    }

    #[test]
    fn impossible_and_ambiguous_dates_stay() {
        for s in [
            "2023년 2월 30일",
            "08/26/2024",
            "version 2024.13.1",
            "May 40, 2024",
            "1.5 and 3.25",
        ] {
            assert_eq!(normalize_dates(s), (s.to_string(), 0), "{s}");
        }
        assert_eq!(normalize_dates("2024년 2월 29일").0, "2024-02-29");
    }
}
