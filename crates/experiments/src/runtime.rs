//! Run set-up shared by the examples and the `scoreguide` command.

use candle_core::{bail, Device, Result, Tensor};
use scoreguide_guidance::{Cond, Score};
use scoreguide_samplers::Sampler;
use scoreguide_sde::SampleNoise;
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

/// Threads used when neither `--threads` nor `RAYON_NUM_THREADS` says otherwise: every
/// available core. On 2 cores, 2 threads take 0.56–0.79 of 1 thread's time for every
/// benchmarked step of both networks (docs/PERFORMANCE.md).
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Sets the CPU thread count (`scoreguide_kernels::threads::configure`: the kernels'
/// and rayon's pool, with candle's own element-wise pool kept at one thread): `threads`
/// if given, else `RAYON_NUM_THREADS`, else [`default_threads`]. Call first thing in
/// `main`, before any tensor work (or use [`on_compute_threads`]). Returns the count.
pub fn set_threads(threads: Option<usize>) -> usize {
    let n = threads
        .or_else(|| {
            std::env::var("RAYON_NUM_THREADS")
                .ok()
                .and_then(|s| s.parse().ok())
        })
        .filter(|n| *n > 0)
        .unwrap_or_else(default_threads);
    scoreguide_kernels::threads::configure(n)
}

/// Sets the thread count ([`set_threads`]) and runs `f` on a thread of the compute pool
/// (`scoreguide_kernels::threads::on_pool`: parallel kernels then use the calling thread
/// instead of waking another while it sleeps). An example's `main` parses its
/// arguments and runs the rest through this.
pub fn on_compute_threads<R: Send>(threads: Option<usize>, f: impl FnOnce() -> R + Send) -> R {
    set_threads(threads);
    keep_freed_pages();
    scoreguide_kernels::threads::on_pool(f)
}

/// Tells mimalloc (the binaries' global allocator) to keep freed pages instead of
/// returning them to the OS 10 ms later: a network allocates the same large buffers
/// every step, and each returned page came back through a page fault and the kernel's
/// zeroing (10% of a scene-transformer training step in `perf`). Memory stays at its
/// peak. No effect on a binary whose allocator is not mimalloc.
pub fn keep_freed_pages() {
    // `mi_option_purge_delay` in mimalloc's header (v2 and v3 alike); the sys crate
    // names no constant for it.
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets one of mimalloc's options; any value is valid (−1: never purge).
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) };
}

/// `cpu`, `cuda` or `cuda:N`.
pub fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                Some(n) => n.parse().map_err(|_| {
                    candle_core::Error::msg(format!("--device {s}: bad GPU ordinal"))
                })?,
                None => 0,
            };
            if !candle_core::utils::cuda_is_available() {
                bail!(
                    "--device {s}: this build has no CUDA support; rebuild with `--features cuda`"
                );
            }
            Device::new_cuda(ordinal)
        }
        other => bail!("--device {other}: expected cpu, cuda or cuda:N"),
    }
}

/// Writes `value` as pretty JSON to `path` atomically, creating the parent directory.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    ensure_parent(path)?;
    let s = serde_json::to_string_pretty(value)
        .map_err(|e| candle_core::Error::msg(format!("JSON for {}: {e}", path.display())))?;
    scoreguide_train::write_atomic(path, format!("{s}\n").as_bytes())
        .map_err(|e| candle_core::Error::msg(format!("writing {}: {e}", path.display())))
}

/// Creates the parent directory of `path` if needed.
pub fn ensure_parent(path: &Path) -> Result<()> {
    if let Some(p) = path.parent() {
        if !p.as_os_str().is_empty() {
            std::fs::create_dir_all(p)
                .map_err(|e| candle_core::Error::msg(format!("creating {}: {e}", p.display())))?;
        }
    }
    Ok(())
}

/// Median wall time in ms of `reps` calls of `f`, after 3 warm-up calls.
pub fn median_ms(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    let mut t: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let s = Instant::now();
            f().map(|_| s.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<_>>()?;
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

/// Median time of one Heun step from σ = `s0` to `s1` on the batch `x`: two denoiser
/// evaluations and the update arithmetic (what a sampling step costs).
pub fn heun_step_ms(
    model: &dyn Score,
    x: &Tensor,
    cond: &Cond,
    s0: f64,
    s1: f64,
    reps: usize,
) -> Result<f64> {
    let heun = Sampler::Heun(scoreguide_samplers::HeunOptions::default());
    sampler_step_ms(model, &heun, x, cond, s0, s1, reps)
}

/// Median time of one step of `sampler` from σ = `s0` to `s1` on the batch `x` (Heun: two
/// denoiser evaluations; DDPM: one and fresh noise), the latency a table's "step ms" means
/// whatever the sampler.
pub fn sampler_step_ms(
    model: &dyn Score,
    sampler: &Sampler,
    x: &Tensor,
    cond: &Cond,
    s0: f64,
    s1: f64,
    reps: usize,
) -> Result<f64> {
    let n = x.dim(0)?;
    let mut noise = SampleNoise::new(0, 0, n);
    median_ms(reps, || {
        // Force the lazy CPU work to finish inside the timed region.
        sampler
            .sample_with(model, x.clone(), &[s0, s1], cond, &mut noise, None)?
            .sum_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_scalar::<f32>()?;
        Ok(())
    })
}

/// Runs this executable once per thread count, each in its own process (a thread pool
/// cannot be resized once started): `--worker T` followed by `args`, with
/// `RAYON_NUM_THREADS=T`; each worker prints its measurement as one JSON line, returned
/// here in the order of `threads`. The benchmarks' way of comparing thread counts.
pub fn measure_in_workers<T: serde::de::DeserializeOwned>(
    threads: &[usize],
    args: &[String],
) -> Result<Vec<T>> {
    let exe = std::env::current_exe().map_err(candle_core::Error::wrap)?;
    let mut rows = Vec::new();
    for &t in threads {
        eprintln!("measuring with {t} thread(s)…");
        let out = std::process::Command::new(&exe)
            .args(["--worker", &t.to_string()])
            .args(args)
            .env("RAYON_NUM_THREADS", t.to_string())
            .output()
            .map_err(candle_core::Error::wrap)?;
        if !out.status.success() {
            bail!(
                "worker with {t} threads failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().last().unwrap_or("");
        rows.push(serde_json::from_str(line.trim()).map_err(|e| {
            candle_core::Error::msg(format!("worker with {t} threads printed `{line}`: {e}"))
        })?);
    }
    Ok(rows)
}

/// Flags every example shares (`#[command(flatten)]` them into an example's own).
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// Seed of everything random (data, initialisation, noise).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Directory for checkpoints and pictures (default: `out/<example>`).
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// Also write the results as JSON here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// CPU threads (default: RAYON_NUM_THREADS, else every core).
    #[arg(long)]
    pub threads: Option<usize>,
}

impl CommonArgs {
    /// The output directory, `out/<example>` unless `--out` was given.
    pub fn out_dir(&self, example: &str) -> std::path::PathBuf {
        self.out
            .clone()
            .unwrap_or_else(|| std::path::Path::new("out").join(example))
    }

    /// Sets the thread count and opens the device; prints both.
    pub fn setup(&self) -> Result<Device> {
        let threads = set_threads(self.threads);
        let dev = device(&self.device)?;
        eprintln!("device {}, {threads} threads", self.device);
        Ok(dev)
    }

    /// [`CommonArgs::setup`], with subnormal floats flushed to zero on every compute
    /// thread ([`flush_subnormals_to_zero`]).
    pub fn setup_flushing_subnormals(&self) -> Result<Device> {
        let threads = set_threads(self.threads);
        flush_subnormals_to_zero(threads)?;
        let dev = device(&self.device)?;
        eprintln!(
            "device {}, {threads} threads, subnormals flushed to zero",
            self.device
        );
        Ok(dev)
    }
}

/// Sets x86-64's FTZ and DAZ flags (subnormal results and inputs become zero) on this
/// thread and on every thread of rayon's global pool (where the kernels run), sized to
/// `threads` if it does not exist yet. Subnormal arithmetic is slow on x86, and a
/// confident classifier's softmax tails produce it: the two-moons DLSM step went from
/// 34.9 to 30.8 ms on one thread (docs/PERFORMANCE.md). Values below 1.2e-38 do not
/// matter to training, but results change in the last bits. A no-op on other
/// architectures.
pub fn flush_subnormals_to_zero(threads: usize) -> Result<()> {
    fn set_flags() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: writing MXCSR's FTZ (bit 15) and DAZ (bit 6) only changes how this
        // thread rounds subnormal floats; no memory is touched.
        #[allow(deprecated)]
        unsafe {
            use std::arch::x86_64::{_mm_getcsr, _mm_setcsr};
            _mm_setcsr(_mm_getcsr() | 0x8040);
        }
    }
    set_threads(Some(threads));
    set_flags();
    rayon::broadcast(|_| set_flags());
    Ok(())
}
