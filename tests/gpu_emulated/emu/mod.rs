//! The CPU emulation harness behind `tests/gpu_emulated/`: builds `driver.cpp` (the kernel sources of
//! `src/gpu/kernels/` compiled by g++ under `cuda_emu.h`) once per test run, and runs one kernel launch per
//! [`Call`] through the driver's launch-file protocol (described at the top of `driver.cpp`).
//!
//! A call mirrors the host code's launch builders (`src/gpu/{nf4,lora,attention,sample,fused}.rs`): buffers, then the
//! arguments in the kernel's signature order, then the grid and block of a [`Launch`] from
//! `loraserve::gpu::launch`. The driver checks the arguments against the kernel's real C++ signature.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use loraserve::gpu::launch::Launch;

/// The files the driver is built from (its own directory, then the kernels).
const SOURCES: [&str; 7] = [
    "tests/gpu_emulated/emu/driver.cpp",
    "tests/gpu_emulated/emu/cuda_emu.h",
    "src/gpu/kernels/nf4.cu",
    "src/gpu/kernels/lora.cu",
    "src/gpu/kernels/attention.cu",
    "src/gpu/kernels/sample.cu",
    "src/gpu/kernels/fused.cu",
];
/// `-ffp-contract=off`: g++ fuses `a*b + c` into a multiply-add in C++ (even in ISO mode) wherever the target
/// has FMA, which the kernels' `__fmul_rn`-style arithmetic must not get.
const CXX_FLAGS: [&str; 9] = [
    "-std=c++20",
    "-O2",
    "-ffp-contract=off",
    "-pthread",
    "-fno-strict-aliasing",
    "-Wall",
    "-Wextra",
    "-Wno-unknown-pragmas",
    "-Wno-unused-parameter",
];

/// The built driver, compiled on first use by any test of this binary.
fn driver() -> &'static Path {
    static DRIVER: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match DRIVER.get_or_init(build_driver) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

fn build_driver() -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    match Command::new("g++").arg("--version").output() {
        Ok(o) if o.status.success() => {}
        _ => {
            return Err("g++ not found: the emulated GPU kernel tests (tests/gpu_emulated/) compile the CUDA \
                        kernels as C++20 with g++ — install it (Debian/Ubuntu: `apt-get install g++`)"
                .into())
        }
    }
    // Named by the sources' hash so that concurrent runs over different sources never share a binary; the
    // compile goes to a private name first, then an atomic rename.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for s in SOURCES {
        std::fs::read(root.join(s)).map_err(|e| format!("reading {s}: {e}"))?.hash(&mut h);
    }
    CXX_FLAGS.hash(&mut h);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("gpu_emu");
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let exe = dir.join(format!("driver-{:016x}", h.finish()));
    let tmp = dir.join(format!("driver.{}.tmp", std::process::id()));
    let out = Command::new("g++")
        .args(CXX_FLAGS)
        .arg("-o")
        .arg(&tmp)
        .arg(root.join(SOURCES[0]))
        .output()
        .map_err(|e| format!("running g++: {e}"))?;
    let diagnostics = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!("g++ failed to build the kernel emulation driver:\n{diagnostics}"));
    }
    if !diagnostics.trim().is_empty() {
        eprintln!("g++ warnings building the kernel emulation driver:\n{diagnostics}");
    }
    std::fs::rename(&tmp, &exe).map_err(|e| format!("renaming the driver: {e}"))?;
    // Drivers built from older sources, unless recent enough that a concurrent run may still use them.
    let stale = |p: &Path| {
        let old = std::fs::metadata(p).and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
        p != exe && old.is_some_and(|age| age.as_secs() > 3600)
    };
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with("driver") && stale(&entry.path()) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(exe)
}

/// A buffer of one [`Call`], by position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf(usize);

/// A kernel argument.
pub enum Arg {
    Buf(Buf),
    I32(i32),
    F32(f32),
}

impl From<Buf> for Arg {
    fn from(b: Buf) -> Self {
        Arg::Buf(b)
    }
}
impl From<i32> for Arg {
    fn from(v: i32) -> Self {
        Arg::I32(v)
    }
}
impl From<f32> for Arg {
    fn from(v: f32) -> Self {
        Arg::F32(v)
    }
}

enum BufSpec {
    Data { dtype: &'static str, bytes: Vec<u8>, misalign: usize },
    Table(Vec<Buf>),
}

/// One kernel launch to emulate.
pub struct Call {
    launch: Launch,
    seed: u64,
    buffers: Vec<BufSpec>,
    args: Vec<Arg>,
}

impl Call {
    pub fn new(launch: Launch) -> Self {
        Call { launch, seed: 1, buffers: vec![], args: vec![] }
    }

    /// The seed of the order in which the emulated threads of a block take turns (see `cuda_emu.h`).
    pub fn seed(&mut self, seed: u64) -> &mut Self {
        self.seed = seed;
        self
    }

    fn push(&mut self, spec: BufSpec) -> Buf {
        self.buffers.push(spec);
        Buf(self.buffers.len() - 1)
    }

    pub fn f32(&mut self, v: &[f32]) -> Buf {
        self.f32_misaligned(v, 0)
    }

    /// An f32 buffer whose data starts `misalign` bytes past a 16-byte boundary (to check that misaligned
    /// vector loads are caught).
    pub fn f32_misaligned(&mut self, v: &[f32], misalign: usize) -> Buf {
        let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.push(BufSpec::Data { dtype: "f32", bytes, misalign })
    }

    pub fn i32(&mut self, v: &[i32]) -> Buf {
        let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.push(BufSpec::Data { dtype: "i32", bytes, misalign: 0 })
    }

    pub fn u32(&mut self, v: &[u32]) -> Buf {
        let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.push(BufSpec::Data { dtype: "u32", bytes, misalign: 0 })
    }

    pub fn u8(&mut self, v: &[u8]) -> Buf {
        self.push(BufSpec::Data { dtype: "u8", bytes: v.to_vec(), misalign: 0 })
    }

    /// A table of the device addresses of `bufs` (`unsigned long long*`, as LoRA's adapter tables).
    pub fn table(&mut self, bufs: &[Buf]) -> Buf {
        self.push(BufSpec::Table(bufs.to_vec()))
    }

    pub fn arg(&mut self, a: impl Into<Arg>) -> &mut Self {
        self.args.push(a.into());
        self
    }

    /// Runs the launch once for each interleaving seed, and requires identical buffers from all: none of the
    /// kernels has atomics, so a result that depends on the threads' order is a race.
    pub fn run_interleavings(&mut self, seeds: &[u64]) -> Result<Outputs, String> {
        let mut first: Option<(u64, Outputs)> = None;
        for &seed in seeds {
            self.seed = seed;
            let out = self.run()?;
            match &first {
                None => first = Some((seed, out)),
                Some((s0, o0)) => {
                    if let Some(b) = (0..out.bufs.len()).find(|&b| out.bufs[b] != o0.bufs[b]) {
                        return Err(format!(
                            "emulated {}: buffer {b} differs between interleaving seeds {s0} and {seed} (a race)",
                            self.launch.kernel
                        ));
                    }
                }
            }
        }
        first.map(|(_, o)| o).ok_or_else(|| "no seeds".to_string())
    }

    /// Runs the launch; `Err` carries the driver's diagnostics (a failed check, a fault, a deadlock).
    pub fn run(&self) -> Result<Outputs, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
        let l = &self.launch;
        let mut spec = format!(
            "kernel {}\ngrid {} {} {}\nblock {} {} {}\nseed {}\n",
            l.kernel, l.grid.0, l.grid.1, l.grid.2, l.block.0, l.block.1, l.block.2, self.seed
        );
        let mut paths = vec![];
        for (i, b) in self.buffers.iter().enumerate() {
            match b {
                BufSpec::Data { dtype, bytes, misalign } => {
                    let path = dir.path().join(format!("b{i}.bin"));
                    std::fs::write(&path, bytes).map_err(|e| format!("writing {}: {e}", path.display()))?;
                    spec += &format!("buffer {i} {dtype} {} {misalign}\n", path.display());
                    paths.push(Some(path));
                }
                BufSpec::Table(bufs) => {
                    let ids: Vec<String> = bufs.iter().map(|b| b.0.to_string()).collect();
                    spec += &format!("table {i} {}\n", ids.join(" "));
                    paths.push(None);
                }
            }
        }
        for a in &self.args {
            spec += &match a {
                Arg::Buf(b) => format!("arg buf {}\n", b.0),
                Arg::I32(v) => format!("arg i32 {v}\n"),
                Arg::F32(v) => format!("arg f32 {:08x}\n", v.to_bits()),
            };
        }
        let launch_file = dir.path().join("launch.txt");
        std::fs::write(&launch_file, spec).map_err(|e| format!("writing the launch file: {e}"))?;
        let out = Command::new(driver()).arg(&launch_file).output().map_err(|e| format!("running the driver: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "emulated {} failed ({}): {}",
                l.kernel,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let bufs = paths
            .iter()
            .map(|p| match p {
                Some(p) => std::fs::read(p.with_extension("bin.out")).map_err(|e| format!("reading the output: {e}")),
                None => Ok(vec![]),
            })
            .collect::<Result<_, _>>()?;
        Ok(Outputs { bufs })
    }
}

/// The buffers after a launch.
pub struct Outputs {
    bufs: Vec<Vec<u8>>,
}

impl Outputs {
    pub fn f32(&self, b: Buf) -> Vec<f32> {
        self.bufs[b.0].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()
    }

    pub fn u32(&self, b: Buf) -> Vec<u32> {
        self.bufs[b.0].chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()
    }
}
