//! Checks for the number flags every BlueBridge binary takes, so that each refuses a bad value
//! with one clear line before it attaches anything (clap reports the `Err` as
//! `error: invalid value '…' for '--flag': <message>`). Integer flags use clap's own ranges;
//! these cover what clap does not: durations given as real numbers, and CPU ids. Also the
//! Ctrl-C handling every binary shares ([`stop_on_signals`]).

/// The longest duration any flag takes, in seconds (one day).
pub const MAX_SECONDS: f64 = 86_400.0;

fn number(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number"))?;
    if !v.is_finite() {
        return Err(format!("`{s}` is not a finite number"));
    }
    Ok(v)
}

/// Seconds, 0 to [`MAX_SECONDS`] (0 means "none" where a flag says so).
pub fn seconds(s: &str) -> Result<f64, String> {
    let v = number(s)?;
    if !(0.0..=MAX_SECONDS).contains(&v) {
        return Err(format!("{s} s is outside 0..={MAX_SECONDS} s"));
    }
    Ok(v)
}

/// Seconds, more than 0 and at most [`MAX_SECONDS`].
pub fn positive_seconds(s: &str) -> Result<f64, String> {
    let v = seconds(s)?;
    if v <= 0.0 {
        return Err(format!("{v} s: must be more than 0"));
    }
    Ok(v)
}

/// A non-negative finite real number (a Zipf exponent, a rate), at most `1e12`.
pub fn non_negative(s: &str) -> Result<f64, String> {
    let v = number(s)?;
    if !(0.0..=1e12).contains(&v) {
        return Err(format!("{s} is outside 0..=1e12"));
    }
    Ok(v)
}

/// A parser for a count from `lo` to `hi` (for flags held in a `usize`; clap's own ranges
/// cover the fixed-width integers).
pub fn count(
    lo: usize,
    hi: usize,
) -> impl Fn(&str) -> Result<usize, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        let v: usize = s
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not a whole number"))?;
        if !(lo..=hi).contains(&v) {
            return Err(format!("{v} is outside {lo}..={hi}"));
        }
        Ok(v)
    }
}

/// A CPU this process may run on.
pub fn cpu(s: &str) -> Result<usize, String> {
    let id: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a CPU number"))?;
    let known = allowed_cpus();
    if !known.contains(&id) {
        return Err(format!(
            "CPU {id} does not exist or is not allowed here (allowed: {})",
            ranges(&known)
        ));
    }
    Ok(id)
}

/// The CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect()
}

/// `0-3,6` for `[0, 1, 2, 3, 6]`.
fn ranges(ids: &[usize]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        let start = ids[i];
        while i + 1 < ids.len() && ids[i + 1] == ids[i] + 1 {
            i += 1;
        }
        out.push(if ids[i] == start {
            start.to_string()
        } else {
            format!("{start}-{}", ids[i])
        });
        i += 1;
    }
    if out.is_empty() {
        "none".into()
    } else {
        out.join(",")
    }
}

/// Sets `flag` on SIGINT (Ctrl-C) and SIGTERM instead of letting them kill the process, so the
/// program can stop cleanly: free what it allocated, detach what it attached.
pub fn stop_on_signals(
    flag: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<()> {
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, flag.clone())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(seconds("1.5"), Ok(1.5));
        assert_eq!(seconds("0"), Ok(0.0));
        for bad in ["nan", "inf", "-inf", "1e300", "-1", "x", ""] {
            assert!(seconds(bad).is_err(), "{bad}");
        }
        assert!(positive_seconds("0").is_err());
        assert_eq!(positive_seconds("86400"), Ok(86_400.0));
        assert!(non_negative("-0.5").is_err() && non_negative("1.1").is_ok());
        let c = count(1, 128);
        assert_eq!(c("128"), Ok(128));
        for bad in ["0", "129", "-1", "18446744073709551616", "1.5"] {
            assert!(c(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cpus() {
        assert_eq!(cpu("0"), Ok(0));
        let e = cpu("99999").unwrap_err();
        assert!(e.contains("CPU 99999 does not exist"), "{e}");
        assert!(cpu("-1").is_err() && cpu("one").is_err());
        assert_eq!(ranges(&[0, 1, 2, 3, 6]), "0-3,6");
        assert_eq!(ranges(&[]), "none");
    }
}
