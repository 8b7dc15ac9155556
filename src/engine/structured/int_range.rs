//! A regex of the integers in a range, written as JSON writes them (no leading zeros, no `-0`, no `+`): JSON
//! Schema's `minimum` / `maximum` (and their exclusive forms) on an `integer`. A range of numbers with as
//! many digits is split where its bounds' digits part, the usual way: `[137, 420]` is `13[7-9]`, `1[4-9][0-9]`,
//! `[23][0-9]{2}`, `4[01][0-9]`, `420`.

/// The integers in `[lo, hi]` (`None`: unbounded on that side); `None` when there are none.
pub fn regex(lo: Option<i64>, hi: Option<i64>) -> Option<String> {
    if let (Some(l), Some(h)) = (lo, hi) {
        if l > h {
            return None;
        }
    }
    let mut alts = Vec::new();
    // Zero and up: [max(lo, 0), hi].
    if hi.is_none_or(|h| h >= 0) {
        alts.push(naturals(lo.map_or(0, |l| l.max(0)) as u64, hi.map(|h| h as u64)));
    }
    // Below zero: the magnitudes [max(-hi, 1), -lo].
    if lo.is_none_or(|l| l < 0) {
        let from = hi.map_or(1, |h| h.min(-1).unsigned_abs());
        alts.push(format!("-(?:{})", naturals(from, lo.map(i64::unsigned_abs))));
    }
    Some(format!("(?:{})", alts.join("|")))
}

/// The naturals in `[lo, hi]` (`hi` at least `lo`; `None`: no end).
fn naturals(lo: u64, hi: Option<u64>) -> String {
    let digits = |n: u64| n.to_string().len();
    let mut alts = Vec::new();
    let last = hi.map_or(digits(lo), digits);
    for d in digits(lo)..=last {
        let first = if d == 1 { 0 } else { 10u64.pow(d as u32 - 1) };
        let end = if d >= 20 { u64::MAX } else { 10u64.pow(d as u32) - 1 };
        let (a, b) = (lo.max(first), hi.map_or(end, |h| h.min(end)));
        if a <= b {
            alts.push(same_length(&a.to_string(), &b.to_string()));
        }
    }
    if hi.is_none() && last < 20 {
        alts.push(format!("[1-9][0-9]{{{},}}", last));
    }
    alts.join("|")
}

/// The numbers from `lo` to `hi`, both of the same number of digits.
fn same_length(lo: &str, hi: &str) -> String {
    let n = lo.len();
    if lo == hi {
        return lo.to_string();
    }
    if lo.bytes().all(|c| c == b'0') && hi.bytes().all(|c| c == b'9') {
        return format!("[0-9]{{{n}}}");
    }
    let (a, b) = (lo.as_bytes()[0], hi.as_bytes()[0]);
    let class = |x: u8, y: u8| if x == y { (x as char).to_string() } else { format!("[{}-{}]", x as char, y as char) };
    if n == 1 {
        return class(a, b);
    }
    let (lo_rest, hi_rest) = (&lo[1..], &hi[1..]);
    if a == b {
        return format!("{}(?:{})", a as char, same_length(lo_rest, hi_rest));
    }
    let (nines, zeros) = ("9".repeat(n - 1), "0".repeat(n - 1));
    let mut alts = vec![format!("{}(?:{})", a as char, same_length(lo_rest, &nines))];
    if b - a > 1 {
        alts.push(format!("{}[0-9]{{{}}}", class(a + 1, b - 1), n - 1));
    }
    alts.push(format!("{}(?:{})", b as char, same_length(&zeros, hi_rest)));
    alts.join("|")
}

#[cfg(test)]
mod tests {
    use super::super::Whole;
    use super::*;

    /// Every integer in a window around each range is matched exactly when it is in the range, as JSON
    /// writes it; no other spelling of it (leading zero, `+`, `-0`) is.
    #[test]
    fn ranges_match_exactly_their_integers() {
        let bounds =
            [None, Some(-1001), Some(-100), Some(-10), Some(-1), Some(0), Some(1), Some(9), Some(10), Some(99)];
        let more = [Some(100), Some(137), Some(420), Some(999), Some(1000), Some(1234)];
        let all: Vec<Option<i64>> = bounds.iter().chain(&more).copied().collect();
        for &lo in &all {
            for &hi in &all {
                let Some(re) = regex(lo, hi) else {
                    assert!(lo > hi && hi.is_some(), "{lo:?}..{hi:?} is not empty");
                    continue;
                };
                let re = Whole::new(&re);
                for n in -1300i64..=1300 {
                    let inside = lo.is_none_or(|l| n >= l) && hi.is_none_or(|h| n <= h);
                    assert_eq!(re.is_match(&n.to_string()), inside, "{n} in {lo:?}..={hi:?}");
                }
                for odd in ["01", "-0", "+1", "00", "-01", ""] {
                    assert!(!re.is_match(odd), "{odd:?} in {lo:?}..={hi:?}");
                }
            }
        }
    }

    #[test]
    fn wide_ranges_reach_the_edges_of_i64() {
        let re = Whole::new(&regex(Some(i64::MIN), Some(i64::MAX)).unwrap());
        for n in [i64::MIN, i64::MIN + 1, -1, 0, 1, i64::MAX - 1, i64::MAX] {
            assert!(re.is_match(&n.to_string()), "{n}");
        }
        let above = Whole::new(&regex(Some(5), None).unwrap());
        assert!(above.is_match("123456789012345678901234567890") && above.is_match("5") && !above.is_match("4"));
    }
}
