//! The NF4 matmul's routing by rows: which kernel family takes a batch of `m` rows (the GEMV, or tensor-core
//! tiles of 16 or 32 rows with K split until the launch has enough blocks). The table compiled in,
//! [`NF4_ROUTES`], is what the device bench measured; `LORASERVE_NF4_ROUTES` replaces it for one process
//! (as vLLM reads tuned kernel configs per device), in the text form [`Routes`] reads and writes:
//! `8:gemv,16:mma16/528,*:mma32`. The device bench sets it to the table its own timings call for
//! (`benches/gpu/routing.py`), so one device call measures the end-to-end step with the kernels it just
//! ranked. A bad table is refused when the device opens, naming the variable and the entry.

use std::fmt;
use std::sync::OnceLock;

/// The variable that replaces [`NF4_ROUTES`] for the process.
pub const ROUTES_VAR: &str = "LORASERVE_NF4_ROUTES";

/// How an NF4 matmul of some number of rows runs (`k % 64 == 0`; other widths take the generic kernel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// The GEMV kernel for the rows (each weight byte read once for all rows, CUDA-core FMAs).
    Gemv,
    /// Tensor-core tiles of `bm` rows, K split (1, 2, 4 or 8 ways, as K's steps allow) until the launch has at
    /// least `blocks` blocks; 0 never splits.
    Mma { bm: usize, blocks: usize },
}

/// The routes by rows, each for row counts up to its bound: what `benches/gpu/routing.py` reads off the device
/// bench's timings. Measured on the H200 (benches/NOTES.md, "First device runs"): two or four 8-row GEMV
/// passes took 1.4 to 2.1 times as long as one 16- or 32-row tensor-core tile. Split-K is not routed to yet:
/// its candidates have not run on a device.
pub const NF4_ROUTES: [(usize, Route); 3] =
    [(8, Route::Gemv), (16, Route::Mma { bm: 16, blocks: 0 }), (usize::MAX, Route::Mma { bm: 32, blocks: 0 })];

/// Rows the largest GEMV kernel takes (`nf4_gemv_r8`).
pub(crate) const GEMV_MAX_ROWS: usize = 8;
/// Row heights of the tensor-core tiles compiled (`nf4_matmul_mma{16,32}`).
pub(crate) const MMA_TILE_ROWS: [usize; 2] = [16, 32];

/// A routing table: routes by rows, each for the row counts up to its bound (after the previous one's), the
/// last for any number of rows. Its text form, `ROWS:ROUTE` entries joined by commas with `*` as the last
/// bound and a route `gemv`, `mma16` or `mma32` (`/BLOCKS` to split K until the launch has that many blocks),
/// is what `LORASERVE_NF4_ROUTES` holds and [`fmt::Display`] writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Routes(Vec<(usize, Route)>);

impl Routes {
    /// The table compiled in, [`NF4_ROUTES`].
    pub fn compiled() -> Self {
        Self::new(NF4_ROUTES.to_vec()).expect("NF4_ROUTES is a valid table (tested)")
    }

    /// A table of `(bound, route)` entries: bounds rising, the last `usize::MAX`, each route a kernel that
    /// exists for its rows.
    pub fn new(entries: Vec<(usize, Route)>) -> Result<Self, String> {
        let mut last = 0;
        for &(rows, route) in &entries {
            let entry = Entry(rows, route);
            if rows <= last {
                return Err(format!("`{entry}`: bounds must rise (it follows {})", Bound(last)));
            }
            match route {
                Route::Gemv if rows > GEMV_MAX_ROWS => {
                    return Err(format!("`{entry}`: the GEMV kernels take up to {GEMV_MAX_ROWS} rows"));
                }
                Route::Mma { bm, .. } if !MMA_TILE_ROWS.contains(&bm) => {
                    return Err(format!("`{entry}`: no tensor-core kernel with {bm}-row tiles (mma16, mma32)"));
                }
                _ => {}
            }
            last = rows;
        }
        if last != usize::MAX {
            return Err("the last route must take any rows: end with `*:ROUTE`".into());
        }
        Ok(Routes(entries))
    }

    /// Reads the text form (whitespace around entries and their parts is ignored).
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Err("no routes (e.g. `8:gemv,16:mma16/528,*:mma32`)".into());
        }
        let entries = text.split(',').map(parse_entry).collect::<Result<Vec<_>, _>>()?;
        Self::new(entries)
    }

    /// The route for `m` rows.
    pub fn route(&self, m: usize) -> Route {
        self.0.iter().find(|&&(rows, _)| m <= rows).map(|&(_, r)| r).expect("the last route takes any rows")
    }

    pub fn entries(&self) -> &[(usize, Route)] {
        &self.0
    }
}

/// The table in effect: `LORASERVE_NF4_ROUTES` when set (read once a process), else [`NF4_ROUTES`].
pub fn in_effect() -> Result<&'static Routes, String> {
    static TABLE: OnceLock<Result<Routes, String>> = OnceLock::new();
    // The crate's unit tests check launch geometry under the compiled table, whatever the environment says.
    if cfg!(test) {
        static COMPILED: OnceLock<Routes> = OnceLock::new();
        return Ok(COMPILED.get_or_init(Routes::compiled));
    }
    TABLE.get_or_init(|| from_var(std::env::var(ROUTES_VAR))).as_ref().map_err(Clone::clone)
}

/// The table `LORASERVE_NF4_ROUTES`'s value (as `std::env::var` reads it) gives.
fn from_var(value: Result<String, std::env::VarError>) -> Result<Routes, String> {
    match value {
        Ok(text) => Routes::parse(&text).map_err(|e| format!("{ROUTES_VAR}={text:?}: {e}")),
        Err(std::env::VarError::NotPresent) => Ok(Routes::compiled()),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("{ROUTES_VAR} is not UTF-8")),
    }
}

/// Whether [`in_effect`] is a table other than the compiled one.
pub fn overridden() -> bool {
    in_effect().is_ok_and(|t| *t != Routes::compiled())
}

fn parse_entry(entry: &str) -> Result<(usize, Route), String> {
    let entry = entry.trim();
    let bad = |why: &str| format!("`{entry}`: {why} (entries are ROWS:ROUTE, e.g. `16:mma16/528`)");
    let Some((rows, route)) = entry.split_once(':') else { return Err(bad("no `:`")) };
    let rows = match rows.trim() {
        "*" => usize::MAX,
        n => number(n).filter(|&n| n > 0).ok_or_else(|| bad("ROWS must be a whole number ≥ 1 or `*`"))?,
    };
    let (kernel, blocks) = match route.trim().split_once('/') {
        Some((kernel, blocks)) => {
            (kernel.trim(), Some(number(blocks.trim()).ok_or_else(|| bad("BLOCKS must be a whole number"))?))
        }
        None => (route.trim(), None),
    };
    let route = match (kernel, blocks) {
        ("gemv", None) => Route::Gemv,
        ("gemv", Some(_)) => return Err(bad("the GEMV never splits K: no `/BLOCKS`")),
        (k, blocks) => match k.strip_prefix("mma").and_then(number) {
            Some(bm) => Route::Mma { bm, blocks: blocks.unwrap_or(0) },
            None => return Err(bad("ROUTE must be `gemv`, `mma16` or `mma32`")),
        },
    };
    Ok((rows, route))
}

/// A whole number as the text form writes it: digits only, no sign, no leading zero.
fn number(s: &str) -> Option<usize> {
    let plain = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    plain.then(|| s.parse().ok()).flatten()
}

/// A bound as the text form writes it.
struct Bound(usize);

impl fmt::Display for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            usize::MAX => f.write_str("*"),
            n => write!(f, "{n}"),
        }
    }
}

/// One entry as the text form writes it.
struct Entry(usize, Route);

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", Bound(self.0))?;
        match self.1 {
            Route::Gemv => f.write_str("gemv"),
            Route::Mma { bm, blocks: 0 } => write!(f, "mma{bm}"),
            Route::Mma { bm, blocks } => write!(f, "mma{bm}/{blocks}"),
        }
    }
}

impl fmt::Display for Routes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, &(rows, route)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{}", Entry(rows, route))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_compiled_table_is_valid_and_reads_back_from_its_text() {
        let t = Routes::compiled();
        assert_eq!(t.to_string(), "8:gemv,16:mma16,*:mma32");
        assert_eq!(Routes::parse(&t.to_string()), Ok(t.clone()));
        assert_eq!(t.route(1), Route::Gemv);
        assert_eq!(t.route(8), Route::Gemv);
        assert_eq!(t.route(9), Route::Mma { bm: 16, blocks: 0 });
        assert_eq!(t.route(17), Route::Mma { bm: 32, blocks: 0 });
        assert_eq!(t.route(usize::MAX), Route::Mma { bm: 32, blocks: 0 });
    }

    #[test]
    fn a_tuned_table_reads_with_splits_and_spaces() {
        let t = Routes::parse(" 1:gemv, 8 : gemv ,16:mma16/528,32:mma16/264,*:mma32").unwrap();
        assert_eq!(
            t.entries(),
            [
                (1, Route::Gemv),
                (8, Route::Gemv),
                (16, Route::Mma { bm: 16, blocks: 528 }),
                (32, Route::Mma { bm: 16, blocks: 264 }),
                (usize::MAX, Route::Mma { bm: 32, blocks: 0 }),
            ]
        );
        assert_eq!(t.to_string(), "1:gemv,8:gemv,16:mma16/528,32:mma16/264,*:mma32");
        assert_eq!(t.route(2), Route::Gemv);
        assert_eq!(t.route(24), Route::Mma { bm: 16, blocks: 264 });
        assert_eq!(t.route(33), Route::Mma { bm: 32, blocks: 0 });
    }

    /// The variable: unset means the compiled table; a bad value is refused naming the variable and the value.
    #[test]
    fn the_variable_replaces_the_table_or_is_refused_by_name() {
        use std::env::VarError;
        assert_eq!(from_var(Err(VarError::NotPresent)), Ok(Routes::compiled()));
        assert_eq!(from_var(Ok("*:mma16/264".into())).unwrap().to_string(), "*:mma16/264");
        let e = from_var(Ok("16:gemv,*:mma32".into())).unwrap_err();
        assert_eq!(e, "LORASERVE_NF4_ROUTES=\"16:gemv,*:mma32\": `16:gemv`: the GEMV kernels take up to 8 rows");
        let e = from_var(Err(VarError::NotUnicode(std::ffi::OsString::new()))).unwrap_err();
        assert_eq!(e, "LORASERVE_NF4_ROUTES is not UTF-8");
    }

    /// Every mistake is refused, naming the entry and what is wrong with it.
    #[test]
    fn bad_tables_are_refused_naming_the_entry() {
        for (text, says) in [
            ("", "no routes"),
            ("  ", "no routes"),
            ("8:gemv,,*:mma32", "``: no `:`"),
            ("8gemv,*:mma32", "`8gemv`: no `:`"),
            ("0:gemv,*:mma32", "`0:gemv`: ROWS must be a whole number ≥ 1"),
            ("-1:gemv,*:mma32", "ROWS must be"),
            ("8:gemv,16:mma16", "end with `*:ROUTE`"),
            ("16:mma16,8:gemv,*:mma32", "`8:gemv`: bounds must rise (it follows 16)"),
            ("8:gemv,8:mma16,*:mma32", "bounds must rise"),
            ("*:mma32,*:mma16", "`*:mma16`: bounds must rise (it follows *)"),
            ("16:gemv,*:mma32", "`16:gemv`: the GEMV kernels take up to 8 rows"),
            ("*:gemv", "take up to 8 rows"),
            ("8:gemv/4,*:mma32", "the GEMV never splits K"),
            ("8:gemv,*:mma64", "`*:mma64`: no tensor-core kernel with 64-row tiles"),
            ("8:gemv,*:mma32/x", "BLOCKS must be a whole number"),
            ("8:gemv,*:tiles", "ROUTE must be `gemv`, `mma16` or `mma32`"),
            ("8:gemv,*:mma016", "ROUTE must be"),
            ("+8:gemv,*:mma32", "ROWS must be"),
            ("08:gemv,*:mma32", "ROWS must be"),
            ("8:gemv,*:mma32/+4", "BLOCKS must be"),
            ("8:gemv,*:mma32/99999999999999999999999", "BLOCKS must be"),
        ] {
            let err = Routes::parse(text).expect_err(text);
            assert!(err.contains(says), "{text:?}: {err}");
        }
    }
}
