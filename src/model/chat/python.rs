//! Python in a chat template's Jinja environment: the two helpers transformers adds, as Python computes them,
//! `tojson` (Python's `json.dumps`, not minijinja's HTML-safe one) and `strftime_now` (`time.strftime`, in
//! UTC here; `tests/fixtures/chat-templates/` holds Python's output for both); and where jinja2's own
//! behaviour is Python's: how a value prints (`formatter`, the `string` filter: `repr` of floats, lists and
//! dicts) and the `round` filter.

use std::fmt::Write as _;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Error, ErrorKind};

fn error(what: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::InvalidOperation, what.to_string())
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`:
/// `json.dumps(x, …)` with those four, positionally or by name. A value JSON cannot hold (undefined, bytes, an
/// object) is an error, as Python's TypeError.
pub(super) fn tojson(value: Value, ensure_ascii: Option<bool>, kwargs: Kwargs) -> Result<Value, Error> {
    let ensure_ascii = match (ensure_ascii, kwargs.get::<Option<bool>>("ensure_ascii")?) {
        (Some(_), Some(_)) => return Err(error("tojson: ensure_ascii given twice")),
        (a, b) => a.or(b).unwrap_or(false),
    };
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        None => None,
        Some(v) if v.is_none() => None,
        // Python: an int (≤ 0 still breaks lines) or a string; True is 1.
        Some(v) if v.kind() == ValueKind::Bool => Some(if v.is_true() { " " } else { "" }.to_string()),
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(n), _) => Some(" ".repeat(n.max(0) as usize)),
            (_, Some(s)) => Some(s.to_string()),
            _ => return Err(error(format!("tojson: indent must be a number or a string, got {v}"))),
        },
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item, key) = match separators.as_deref() {
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
        Some([item, key]) => (item.clone(), key.clone()),
        Some(other) => return Err(error(format!("tojson: separators must be two strings, got {other:?}"))),
    };
    let py = PyJson { indent, item, key, sort_keys, ensure_ascii };
    let mut out = String::new();
    py.write(&mut out, &value, 0)?;
    Ok(Value::from_safe_string(out))
}

/// Python's `json.dumps` layout.
struct PyJson {
    indent: Option<String>,
    item: String,
    key: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl PyJson {
    fn write(&self, out: &mut String, v: &Value, depth: usize) -> Result<(), Error> {
        match v.kind() {
            ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number if v.is_integer() => out.push_str(&v.to_string()),
            ValueKind::Number => out.push_str(&py_float(f64::try_from(v.clone())?)),
            ValueKind::String => self.string(out, v.as_str().unwrap_or_default()),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                self.container(out, '[', ']', items.len(), depth, |out, i| self.write(out, &items[i], depth + 1))?;
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                self.container(out, '{', '}', keys.len(), depth, |out, i| {
                    self.string(out, &key_string(&keys[i])?);
                    out.push_str(&self.key);
                    self.write(out, &v.get_item(&keys[i])?, depth + 1)
                })?;
            }
            other => return Err(error(format!("tojson: a value of kind {other} is not JSON serializable"))),
        }
        Ok(())
    }

    fn container(
        &self,
        out: &mut String,
        open: char,
        close: char,
        len: usize,
        depth: usize,
        mut each: impl FnMut(&mut String, usize) -> Result<(), Error>,
    ) -> Result<(), Error> {
        out.push(open);
        if len > 0 {
            for i in 0..len {
                if i > 0 {
                    out.push_str(&self.item);
                }
                self.newline(out, depth + 1);
                each(out, i)?;
            }
            self.newline(out, depth);
        }
        out.push(close);
        Ok(())
    }

    fn newline(&self, out: &mut String, depth: usize) {
        if let Some(indent) = &self.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth));
        }
    }

    fn string(&self, out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                }
                // ensure_ascii escapes everything outside ' '..='~' (DEL included), as UTF-16 units.
                c if self.ensure_ascii && !(' '..='~').contains(&c) => {
                    let mut units = [0u16; 2];
                    for u in c.encode_utf16(&mut units) {
                        let _ = write!(out, "\\u{u:04x}");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// A map key as `json.dumps` writes it: strings as they are, numbers, booleans and None as their JSON text.
fn key_string(k: &Value) -> Result<String, Error> {
    Ok(match k.kind() {
        ValueKind::String => k.as_str().unwrap_or_default().to_string(),
        ValueKind::None => "null".into(),
        ValueKind::Bool => (if k.is_true() { "true" } else { "false" }).into(),
        ValueKind::Number if k.is_integer() => k.to_string(),
        ValueKind::Number => py_float(f64::try_from(k.clone())?),
        other => return Err(error(format!("tojson: keys must be str, int, float, bool or None, not {other}"))),
    })
}

/// Python's `repr(float)` (and `json.dumps`'s float text): the shortest digits that round-trip, positional
/// when the decimal point falls within 16 places, else `1e-05` / `1e+16` style; `NaN`, `Infinity`.
fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let sci = format!("{f:e}"); // shortest round-trip digits: "-1.5e16", "1e-5", "0e0"
    let (mantissa, exp) = sci.split_once('e').expect("{:e} writes an exponent");
    let exp: i32 = exp.parse().expect("{:e} writes an integer exponent");
    let (sign, mantissa) = mantissa.strip_prefix('-').map_or(("", mantissa), |m| ("-", m));
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    // The value is 0.DIGITS × 10^point.
    let point = exp + 1;
    let n = digits.len() as i32;
    if point > -4 && point <= 16 {
        if point <= 0 {
            format!("{sign}0.{}{digits}", "0".repeat(-point as usize))
        } else if point >= n {
            format!("{sign}{digits}{}.0", "0".repeat((point - n) as usize))
        } else {
            format!("{sign}{}.{}", &digits[..point as usize], &digits[point as usize..])
        }
    } else {
        let rest = if n > 1 { format!(".{}", &digits[1..]) } else { String::new() };
        let e = point - 1;
        format!("{sign}{}{rest}e{}{:02}", &digits[..1], if e < 0 { '-' } else { '+' }, e.abs())
    }
}

/// How jinja2 prints a value in the output (`str(x)`) where minijinja's own text differs: a float as Python's
/// `repr` (`1e+20`, not `100000000000000000000.0`), and a list or dict as Python's `repr` (`[1, 'a', None]`,
/// `{'k': 1.5}`), strings inside quoted as Python quotes them. Everything else as minijinja prints it.
pub(super) fn formatter(out: &mut minijinja::Output, state: &minijinja::State, value: &Value) -> Result<(), Error> {
    match py_str(value) {
        Some(text) => out.write_str(&text).map_err(Error::from),
        None => minijinja::escape_formatter(out, state, value),
    }
}

/// jinja2's `string` filter: Python's `str(x)`, as [`formatter`] prints it.
pub(super) fn string(value: Value) -> String {
    py_str(&value).unwrap_or_else(|| value.to_string())
}

/// Python's `str(x)` where minijinja's text differs (floats, lists, dicts); `None` where it does not.
fn py_str(value: &Value) -> Option<String> {
    match value.kind() {
        ValueKind::Number if value.is_integer() => None,
        ValueKind::Number | ValueKind::Seq | ValueKind::Map => {
            let mut text = String::new();
            repr(value, &mut text);
            Some(text)
        }
        _ => None,
    }
}

/// Python's `repr(x)` of a template value, as far as templates hold values (none, booleans, numbers, strings,
/// lists, dicts). A string's characters are kept as they are except the ASCII controls, the quote and the
/// backslash, and the separators and format characters Python also escapes (unassigned code points are kept).
fn repr(v: &Value, out: &mut String) {
    match v.kind() {
        ValueKind::None | ValueKind::Undefined => out.push_str("None"),
        ValueKind::Bool => out.push_str(if v.is_true() { "True" } else { "False" }),
        ValueKind::Number if v.is_integer() => out.push_str(&v.to_string()),
        ValueKind::Number => {
            let f = f64::try_from(v.clone()).unwrap_or(f64::NAN);
            out.push_str(&match py_float(f).as_str() {
                "NaN" => "nan".to_string(),
                "Infinity" => "inf".to_string(),
                "-Infinity" => "-inf".to_string(),
                other => other.to_string(),
            });
        }
        ValueKind::String => repr_str(v.as_str().unwrap_or(""), out),
        ValueKind::Seq | ValueKind::Map => {
            // A map iterates its keys; each is followed by its value.
            let map = v.kind() == ValueKind::Map;
            out.push(if map { '{' } else { '[' });
            for (i, item) in v.try_iter().into_iter().flatten().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                repr(&item, out);
                if map {
                    out.push_str(": ");
                    repr(&v.get_item(&item).unwrap_or_default(), out);
                }
            }
            out.push(if map { '}' } else { ']' });
        }
        _ => out.push_str(&v.to_string()),
    }
}

/// Python's `repr(str)`: single quotes unless the text holds one and no double quote.
fn repr_str(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if !py_printable(c) => {
                let n = c as u32;
                let _ = match n {
                    0..=0xff => write!(out, "\\x{n:02x}"),
                    0x100..=0xffff => write!(out, "\\u{n:04x}"),
                    _ => write!(out, "\\U{n:08x}"),
                };
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// Python's `str.isprintable` for one character, but for unassigned code points (kept): not a control
/// (Cc), a format character (Cf), a surrogate or private-use character, nor a separator other than the space.
fn py_printable(c: char) -> bool {
    let n = c as u32;
    !(c.is_control()
        || matches!(n, 0xa0 | 0xad | 0x600..=0x605 | 0x61c | 0x6dd | 0x70f | 0x1680 | 0x180e)
        || matches!(n, 0x2000..=0x200f | 0x2028..=0x202f | 0x205f..=0x2064 | 0x2066..=0x206f | 0x3000)
        || matches!(n, 0xfeff | 0xfff9..=0xfffb | 0xe000..=0xf8ff | 0xf0000..=0x10ffff)
        || matches!(n, 0x890 | 0x891 | 0x8e2 | 0x110bd | 0x110cd | 0x13430..=0x1343f | 0x1bca0..=0x1bca3)
        || matches!(n, 0x1d173..=0x1d17a | 0xe0001 | 0xe0020..=0xe007f))
}

/// jinja2's `round(value, precision=0, method='common')`: `common` is Python's `round` (ties to even, on the
/// exact binary value: `2.5 | round` is `2.0`), an integer staying an integer; `ceil` and `floor` give floats.
pub(super) fn round(
    value: Value,
    precision: Option<i32>,
    method: Option<String>,
    kwargs: Kwargs,
) -> Result<Value, Error> {
    let precision = match (precision, kwargs.get::<Option<i32>>("precision")?) {
        (Some(_), Some(_)) => return Err(error("round: precision given twice")),
        (a, b) => a.or(b).unwrap_or(0),
    };
    let method = match (method, kwargs.get::<Option<String>>("method")?) {
        (Some(_), Some(_)) => return Err(error("round: method given twice")),
        (a, b) => a.or(b).unwrap_or_else(|| "common".into()),
    };
    kwargs.assert_all_used()?;
    if value.kind() != ValueKind::Number {
        return Err(error(format!("round: a number, not {}", value.kind())));
    }
    // Past these a float is unchanged or zero (CPython's bounds; no 2 GB of digits for a huge precision).
    let precision = precision.clamp(-400, 400);
    let scale = 10f64.powi(precision);
    match method.as_str() {
        "common" if value.is_integer() && precision >= 0 => Ok(value),
        "common" if value.is_integer() => {
            // Python's round(int, -k): the nearest multiple of 10^k, ties to even, still an integer.
            let n = i128::try_from(value)?;
            let Some(m) = 10i128.checked_pow(precision.unsigned_abs()) else { return Ok(Value::from(0)) };
            let (q, r) = (n.div_euclid(m), n.rem_euclid(m));
            let q = if 2 * r > m || (2 * r == m && q % 2 != 0) { q + 1 } else { q };
            Ok(Value::from(q.checked_mul(m).ok_or_else(|| error("round: the result is past 128-bit integers"))?))
        }
        "common" => {
            let f = f64::try_from(value)?;
            let r = match precision {
                p if p > 323 || !f.is_finite() => f,
                p if p < -308 => 0.0 * f,
                // Rust writes the exact binary value rounded half to even, as Python's round reads it.
                p if p >= 0 => format!("{f:.*}", p as usize).parse().unwrap_or(f),
                p => (f / 10f64.powi(-p)).round_ties_even() * 10f64.powi(-p),
            };
            Ok(Value::from(r))
        }
        "ceil" => Ok(Value::from((f64::try_from(value)? * scale).ceil() / scale)),
        "floor" => Ok(Value::from((f64::try_from(value)? * scale).floor() / scale)),
        other => Err(error(format!("round: method must be common, ceil or floor, not {other:?}"))),
    }
}

/// transformers' `strftime_now(format)` at `secs`: Python's `datetime.strftime` of a naive datetime (`%z` and
/// `%Z` empty), in UTC (a server's clock, not a user's), for the C locale's directives (glibc's `-` flag, no
/// padding, included); others are refused by name.
pub fn strftime_utc(format: &str, secs: i64) -> Result<String, String> {
    const DAYS: [&str; 7] = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = secs.div_euclid(86_400);
    let of_day = secs.rem_euclid(86_400);
    let (hour, minute, second) = (of_day / 3600, of_day % 3600 / 60, of_day % 60);
    let (year, month, day) = civil_from_days(days);
    let weekday = (days + 4).rem_euclid(7); // 1970-01-01 was a Thursday; 0 = Sunday
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
    let (day_name, month_name) = (DAYS[weekday as usize], MONTHS[month as usize - 1]);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut directive = chars.next();
        let unpadded = directive == Some('-');
        if unpadded {
            directive = chars.next();
        }
        // A number padded to `width` with `fill`, or not at all under `-`.
        let mut num = |n: i64, width: usize, fill: char| {
            let text = n.to_string();
            if !unpadded {
                out.extend(std::iter::repeat_n(fill, width.saturating_sub(text.len())));
            }
            out.push_str(&text);
        };
        match directive {
            Some('d') => num(day as i64, 2, '0'),
            Some('e') => num(day as i64, 2, ' '),
            Some('H') => num(hour, 2, '0'),
            Some('I') => num(hour12, 2, '0'),
            Some('j') => num(day_of_year, 3, '0'),
            Some('m') => num(month as i64, 2, '0'),
            Some('M') => num(minute, 2, '0'),
            Some('S') => num(second, 2, '0'),
            Some('y') => num(year.rem_euclid(100), 2, '0'),
            Some('C') => num(year.div_euclid(100), 2, '0'),
            Some('Y') => num(year, 1, '0'),
            Some('u') => num(if weekday == 0 { 7 } else { weekday }, 1, '0'),
            Some('w') => num(weekday, 1, '0'),
            Some(d) if unpadded => return Err(format!("strftime_now: unsupported directive %-{d} in {format:?}")),
            Some('a') => out.push_str(&day_name[..3]),
            Some('A') => out.push_str(day_name),
            Some('b') | Some('h') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('c') => {
                let _ = write!(
                    out,
                    "{} {} {day:2} {hour:02}:{minute:02}:{second:02} {year}",
                    &day_name[..3],
                    &month_name[..3]
                );
            }
            Some('x') | Some('D') => {
                let _ = write!(out, "{month:02}/{day:02}/{:02}", year.rem_euclid(100));
            }
            Some('F') => {
                let _ = write!(out, "{year}-{month:02}-{day:02}");
            }
            Some('X') | Some('T') => {
                let _ = write!(out, "{hour:02}:{minute:02}:{second:02}");
            }
            Some('R') => {
                let _ = write!(out, "{hour:02}:{minute:02}");
            }
            // transformers formats a naive `datetime.now()`: no zone to name.
            Some('z') | Some('Z') => {}
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('%') => out.push('%'),
            Some(other) => return Err(format!("strftime_now: unsupported directive %{other} in {format:?}")),
            None => return Err(format!("strftime_now: {format:?} ends in a lone %")),
        }
    }
    Ok(out)
}

/// (year, month, day) of a day count since 1970-01-01 (proleptic Gregorian; Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Days since 1970-01-01 of a civil date (the inverse of [`civil_from_days`]).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_round_trip() {
        for days in [-719_468, -1, 0, 59, 60, 365, 10_956, 11_016, 20_000, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn unsupported_directives_are_named() {
        assert!(strftime_utc("%Q", 0).unwrap_err().contains("%Q"));
        assert!(strftime_utc("%-a", 0).unwrap_err().contains("%-a"));
        assert!(strftime_utc("50%", 0).unwrap_err().contains("lone %"));
    }

    /// Python's `repr(float)` for the boundaries of its two layouts.
    #[test]
    fn floats_print_as_python_prints_them() {
        let cases = [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (0.1, "0.1"),
            (2.5, "2.5"),
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.2345e17, "1.2345e+17"),
            (123456.789, "123456.789"),
            (1.5e300, "1.5e+300"),
            (f64::INFINITY, "Infinity"),
            (f64::NEG_INFINITY, "-Infinity"),
            (f64::NAN, "NaN"),
        ];
        for (f, want) in cases {
            assert_eq!(py_float(f), want, "{f:e}");
        }
    }
}
