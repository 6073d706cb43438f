//! How much memory the machine can give a run, to refuse one that cannot fit before it
//! allocates (an allocation failure aborts the process).

/// Bytes available to a new allocation without swapping (Linux's `MemAvailable`); `None` where
/// it cannot be read.
pub fn available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// `bytes` as GiB with two decimals, for messages.
pub fn gib(bytes: f64) -> String {
    format!("{:.2} GiB", bytes / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_a_plausible_amount_on_linux() {
        if cfg!(target_os = "linux") {
            let a = super::available().expect("MemAvailable");
            assert!(a > 1 << 20, "{a}");
        }
        assert_eq!(super::gib(1.5 * (1u64 << 30) as f64), "1.50 GiB");
    }
}
