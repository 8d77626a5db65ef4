//! Collectives through libtorch's own c10d: the `ProcessGroupGloo` (CPU) and
//! `ProcessGroupNCCL` (GPU) that `torch.distributed` uses, behind one Rust API.
//!
//! A group forms over a `TCPStore` that rank 0 hosts at `master_addr:master_port`
//! (torchrun's `MASTER_ADDR`/`MASTER_PORT`, [`Rendezvous::from_env`]). Every
//! collective is bounded by the group's timeout: a dead or stuck peer gives each
//! other rank an [`Error::Collective`] naming the operation and the rank, never
//! a hang.

use std::ffi::{c_char, c_int, CStr, CString};
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::time::Duration;

use tch::{Device, Tensor};

#[allow(non_camel_case_types)]
mod ffi {
    use std::ffi::{c_char, c_int};
    #[repr(C)]
    pub struct sana_pg {
        _p: [u8; 0],
    }
    #[repr(C)]
    pub struct sana_work {
        _p: [u8; 0],
    }
    /// `at::Tensor*`, which is what tch's `C_tensor` pointers are.
    pub type Tensor = torch_sys::C_tensor;
    extern "C" {
        pub fn sana_c10d_free_string(s: *mut c_char);
        pub fn sana_c10d_has_nccl() -> c_int;
        pub fn sana_c10d_new(
            backend: c_int,
            master: *const c_char,
            port: u16,
            rank: c_int,
            world: c_int,
            timeout_ms: i64,
            local_host: *const c_char,
            prefix: *const c_char,
            err: *mut *mut c_char,
        ) -> *mut sana_pg;
        pub fn sana_c10d_free(pg: *mut sana_pg);
        pub fn sana_c10d_all_reduce(
            pg: *mut sana_pg,
            t: *mut Tensor,
            op: c_int,
            err: *mut *mut c_char,
        ) -> *mut sana_work;
        pub fn sana_c10d_broadcast(
            pg: *mut sana_pg,
            t: *mut Tensor,
            root: c_int,
            err: *mut *mut c_char,
        ) -> *mut sana_work;
        pub fn sana_c10d_all_gather(
            pg: *mut sana_pg,
            out: *mut Tensor,
            input: *mut Tensor,
            err: *mut *mut c_char,
        ) -> *mut sana_work;
        pub fn sana_c10d_reduce_scatter(
            pg: *mut sana_pg,
            out: *mut Tensor,
            input: *mut Tensor,
            op: c_int,
            err: *mut *mut c_char,
        ) -> *mut sana_work;
        pub fn sana_c10d_barrier(pg: *mut sana_pg, err: *mut *mut c_char) -> *mut sana_work;
        pub fn sana_c10d_wait(w: *mut sana_work, timeout_ms: i64, err: *mut *mut c_char) -> c_int;
        pub fn sana_c10d_is_completed(w: *mut sana_work) -> c_int;
        pub fn sana_c10d_work_free(w: *mut sana_work);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "rank {rank} of {world}: forming the {backend} group at {master} failed: {message} \
         (every rank must start within the timeout and reach rank 0's address)"
    )]
    Setup {
        backend: Backend,
        master: String,
        rank: usize,
        world: usize,
        message: String,
    },
    #[error("rank {rank} of {world}: {op} failed: {message}")]
    Collective {
        op: &'static str,
        rank: usize,
        world: usize,
        message: String,
    },
    #[error("{0}")]
    Usage(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Which c10d backend carries the collectives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// ProcessGroupGloo: CPU tensors, TCP.
    Gloo,
    /// ProcessGroupNCCL: CUDA tensors.
    Nccl,
}

impl Backend {
    /// NCCL for CUDA devices, Gloo otherwise (as torch.distributed's default).
    pub fn for_device(device: Device) -> Self {
        match device {
            Device::Cuda(_) => Backend::Nccl,
            _ => Backend::Gloo,
        }
    }

    /// Whether this build has NCCL compiled in.
    pub fn nccl_available() -> bool {
        unsafe { ffi::sana_c10d_has_nccl() != 0 }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
    Min,
    Product,
    /// Mean over ranks. Gloo has no AVG, so there it is a sum divided by the world size.
    Avg,
}

impl ReduceOp {
    fn code(self) -> c_int {
        match self {
            ReduceOp::Sum => 0,
            ReduceOp::Max => 1,
            ReduceOp::Min => 2,
            ReduceOp::Product => 3,
            ReduceOp::Avg => 4,
        }
    }
}

/// Where and how the ranks of one group meet.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendezvous {
    /// Rank 0's address; it hosts the TCPStore.
    pub master_addr: String,
    pub master_port: u16,
    pub rank: usize,
    pub world_size: usize,
    /// Bounds forming the group and every collective.
    pub timeout: Duration,
    /// The address Gloo binds on this host (None: this host's name, else loopback).
    pub local_addr: Option<String>,
    /// Keys prefix in the store, so several groups can share one store address.
    pub prefix: String,
}

impl Rendezvous {
    pub fn new(master_addr: &str, master_port: u16, rank: usize, world_size: usize) -> Self {
        Self {
            master_addr: master_addr.to_string(),
            master_port,
            rank,
            world_size,
            timeout: Duration::from_secs(600),
            local_addr: None,
            prefix: "sana".into(),
        }
    }

    /// torchrun's variables (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`),
    /// or Slurm's (`SLURM_PROCID`, `SLURM_NTASKS`) for rank and size.
    pub fn from_env() -> Result<Self> {
        let var = |names: &[&str]| names.iter().find_map(|n| std::env::var(n).ok());
        let num = |names: &[&str], what: &str| -> Result<Option<usize>> {
            match var(names) {
                None => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| {
                    Error::Usage(format!("{} = {v:?} is not a {what}", names.join(" / ")))
                }),
            }
        };
        let rank = num(&["RANK", "SLURM_PROCID"], "rank")?.unwrap_or(0);
        let world = num(&["WORLD_SIZE", "SLURM_NTASKS"], "world size")?.unwrap_or(1);
        let addr = var(&["MASTER_ADDR"]).unwrap_or_else(|| "127.0.0.1".into());
        let port = match var(&["MASTER_PORT"]) {
            None => 29500,
            Some(p) => p
                .trim()
                .parse()
                .map_err(|_| Error::Usage(format!("MASTER_PORT = {p:?} is not a port")))?,
        };
        Ok(Self::new(&addr, port, rank, world))
    }
}

/// One process group: this rank's handle on the collectives of all ranks.
pub struct ProcessGroup {
    raw: NonNull<ffi::sana_pg>,
    backend: Backend,
    rank: usize,
    world: usize,
    timeout: Duration,
}

// c10d backends are used from one thread at a time here; moving the handle between
// threads is fine (torch.distributed does it too).
unsafe impl Send for ProcessGroup {}

fn take_err(err: *mut c_char) -> String {
    if err.is_null() {
        return "unknown error".into();
    }
    let s = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .trim()
        .to_string();
    unsafe { ffi::sana_c10d_free_string(err) };
    s
}

impl ProcessGroup {
    /// Forms the group; blocks until every rank has joined (or the timeout).
    pub fn new(backend: Backend, rdv: &Rendezvous) -> Result<Self> {
        let usage = |m: String| Err(Error::Usage(m));
        if rdv.world_size == 0 || rdv.rank >= rdv.world_size {
            return usage(format!(
                "rank {} is outside a world of {} ranks",
                rdv.rank, rdv.world_size
            ));
        }
        let cstr = |s: &str, what: &str| {
            CString::new(s).map_err(|_| Error::Usage(format!("{what} {s:?} contains a NUL byte")))
        };
        let master = cstr(&rdv.master_addr, "master address")?;
        let local = rdv
            .local_addr
            .as_deref()
            .map(|a| cstr(a, "local address"))
            .transpose()?;
        let prefix = cstr(&rdv.prefix, "store prefix")?;
        if backend == Backend::Nccl && std::env::var_os("TORCH_NCCL_BLOCKING_WAIT").is_none() {
            // Without it NCCL's wait() returns at once and a timeout aborts the
            // process from the watchdog instead of failing the call.
            std::env::set_var("TORCH_NCCL_BLOCKING_WAIT", "1");
        }
        let span =
            tracing::info_span!("c10d_init", %backend, rank = rdv.rank, world = rdv.world_size);
        let _e = span.enter();
        let mut err = std::ptr::null_mut();
        let raw = unsafe {
            ffi::sana_c10d_new(
                match backend {
                    Backend::Gloo => 0,
                    Backend::Nccl => 1,
                },
                master.as_ptr(),
                rdv.master_port,
                rdv.rank as c_int,
                rdv.world_size as c_int,
                rdv.timeout.as_millis().min(i64::MAX as u128) as i64,
                local.as_ref().map_or(std::ptr::null(), |l| l.as_ptr()),
                prefix.as_ptr(),
                &mut err,
            )
        };
        match NonNull::new(raw) {
            Some(raw) => {
                tracing::debug!("process group formed");
                Ok(Self {
                    raw,
                    backend,
                    rank: rdv.rank,
                    world: rdv.world_size,
                    timeout: rdv.timeout,
                })
            }
            None => Err(Error::Setup {
                backend,
                master: format!("{}:{}", rdv.master_addr, rdv.master_port),
                rank: rdv.rank,
                world: rdv.world_size,
                message: take_err(err),
            }),
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn check(&self, op: &'static str, t: &Tensor) -> Result<()> {
        let bad = |m: String| {
            Err(Error::Usage(format!(
                "rank {} of {}: {op}: {m}",
                self.rank, self.world
            )))
        };
        if !t.is_contiguous() {
            return bad("the tensor must be contiguous".into());
        }
        match (self.backend, t.device()) {
            (Backend::Gloo, Device::Cpu) | (Backend::Nccl, Device::Cuda(_)) => Ok(()),
            (b, d) => bad(format!("a {b} group cannot take a tensor on {d:?}")),
        }
    }

    fn started<'a>(
        &self,
        op: &'static str,
        raw: *mut ffi::sana_work,
        err: *mut c_char,
        divide: Option<Tensor>,
    ) -> Result<Work<'a>> {
        match NonNull::new(raw) {
            Some(raw) => Ok(Work {
                raw: Some(raw),
                op,
                rank: self.rank,
                world: self.world,
                divide,
                _borrow: PhantomData,
            }),
            None => Err(self.failed(op, take_err(err))),
        }
    }

    fn failed(&self, op: &'static str, message: String) -> Error {
        Error::Collective {
            op,
            rank: self.rank,
            world: self.world,
            message,
        }
    }

    /// Starts an in-place all-reduce of `t`; the returned [`Work`] borrows it until waited.
    pub fn all_reduce_async<'a>(&'a self, t: &'a mut Tensor, op: ReduceOp) -> Result<Work<'a>> {
        self.check("all_reduce", t)?;
        self.check_avg("all_reduce", op, t)?;
        // Gloo has no AVG: sum, then divide once the sum has landed.
        let (code, divide) = match (op, self.backend) {
            (ReduceOp::Avg, Backend::Gloo) => (ReduceOp::Sum.code(), Some(t.shallow_clone())),
            _ => (op.code(), None),
        };
        let mut err = std::ptr::null_mut();
        let raw =
            unsafe { ffi::sana_c10d_all_reduce(self.raw.as_ptr(), t.as_mut_ptr(), code, &mut err) };
        self.started("all_reduce", raw, err, divide)
    }

    pub fn all_reduce(&self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        self.all_reduce_async(t, op)?.wait()
    }

    /// Overwrites `t` on every rank with `root`'s.
    pub fn broadcast(&self, t: &mut Tensor, root: usize) -> Result<()> {
        self.check("broadcast", t)?;
        if root >= self.world {
            return Err(Error::Usage(format!(
                "broadcast root {root} is outside a world of {}",
                self.world
            )));
        }
        let mut err = std::ptr::null_mut();
        let raw = unsafe {
            ffi::sana_c10d_broadcast(self.raw.as_ptr(), t.as_mut_ptr(), root as c_int, &mut err)
        };
        self.started("broadcast", raw, err, None)?.wait()
    }

    /// `out` (world × `input`'s elements) receives every rank's `input`, in rank order.
    pub fn all_gather_async<'a>(
        &'a self,
        out: &'a mut Tensor,
        input: &'a Tensor,
    ) -> Result<Work<'a>> {
        self.check("all_gather", out)?;
        self.check("all_gather", input)?;
        self.sizes_fit("all_gather", out.numel(), input.numel())?;
        let mut err = std::ptr::null_mut();
        let mut input = input.shallow_clone();
        let raw = unsafe {
            ffi::sana_c10d_all_gather(
                self.raw.as_ptr(),
                out.as_mut_ptr(),
                input.as_mut_ptr(),
                &mut err,
            )
        };
        self.started("all_gather", raw, err, None)
    }

    pub fn all_gather(&self, out: &mut Tensor, input: &Tensor) -> Result<()> {
        self.all_gather_async(out, input)?.wait()
    }

    /// `input` holds world parts of `out`'s size; rank r receives the reduction of part r.
    pub fn reduce_scatter_async<'a>(
        &'a self,
        out: &'a mut Tensor,
        input: &'a Tensor,
        op: ReduceOp,
    ) -> Result<Work<'a>> {
        self.check("reduce_scatter", out)?;
        self.check_avg("reduce_scatter", op, out)?;
        self.check("reduce_scatter", input)?;
        self.sizes_fit("reduce_scatter", input.numel(), out.numel())?;
        let (code, divide) = match (op, self.backend) {
            (ReduceOp::Avg, Backend::Gloo) => (ReduceOp::Sum.code(), Some(out.shallow_clone())),
            _ => (op.code(), None),
        };
        let mut err = std::ptr::null_mut();
        let mut input = input.shallow_clone();
        let raw = unsafe {
            ffi::sana_c10d_reduce_scatter(
                self.raw.as_ptr(),
                out.as_mut_ptr(),
                input.as_mut_ptr(),
                code,
                &mut err,
            )
        };
        self.started("reduce_scatter", raw, err, divide)
    }

    pub fn reduce_scatter(&self, out: &mut Tensor, input: &Tensor, op: ReduceOp) -> Result<()> {
        self.reduce_scatter_async(out, input, op)?.wait()
    }

    pub fn barrier(&self) -> Result<()> {
        let mut err = std::ptr::null_mut();
        let raw = unsafe { ffi::sana_c10d_barrier(self.raw.as_ptr(), &mut err) };
        self.started("barrier", raw, err, None)?.wait()
    }

    /// A mean is only defined for floating-point tensors.
    fn check_avg(&self, op: &'static str, r: ReduceOp, t: &Tensor) -> Result<()> {
        if r == ReduceOp::Avg && !t.is_floating_point() {
            return Err(Error::Usage(format!(
                "rank {} of {}: {op}: Avg needs a floating-point tensor, not {:?}",
                self.rank,
                self.world,
                t.kind()
            )));
        }
        Ok(())
    }

    fn sizes_fit(&self, op: &'static str, whole: usize, part: usize) -> Result<()> {
        if whole != part * self.world {
            return Err(Error::Usage(format!(
                "rank {} of {}: {op}: {whole} elements are not {} ranks × {part}",
                self.rank, self.world, self.world
            )));
        }
        Ok(())
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        unsafe { ffi::sana_c10d_free(self.raw.as_ptr()) }
    }
}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ProcessGroup({} rank {} of {})",
            self.backend, self.rank, self.world
        )
    }
}

/// A collective in flight. It borrows its tensors until [`Work::wait`]
/// returns; dropping it unwaited waits (ignoring errors) so no write lands later.
#[must_use = "a collective is only done once waited"]
pub struct Work<'a> {
    raw: Option<NonNull<ffi::sana_work>>,
    op: &'static str,
    rank: usize,
    world: usize,
    divide: Option<Tensor>,
    _borrow: PhantomData<&'a mut Tensor>,
}

impl Work<'_> {
    pub fn is_completed(&self) -> bool {
        self.raw
            .is_some_and(|w| unsafe { ffi::sana_c10d_is_completed(w.as_ptr()) } != 0)
    }

    /// Blocks until done; errors when a peer died or the group's timeout passed.
    pub fn wait(mut self) -> Result<()> {
        let Some(raw) = self.raw.take() else {
            return Ok(());
        };
        let mut err = std::ptr::null_mut();
        let ok = unsafe { ffi::sana_c10d_wait(raw.as_ptr(), 0, &mut err) } != 0;
        unsafe { ffi::sana_c10d_work_free(raw.as_ptr()) };
        if !ok {
            return Err(Error::Collective {
                op: self.op,
                rank: self.rank,
                world: self.world,
                message: take_err(err),
            });
        }
        self.finish_avg();
        Ok(())
    }

    /// Gloo's emulated Avg: the sum has landed, divide it.
    fn finish_avg(&mut self) {
        if let Some(mut t) = self.divide.take() {
            let _ = t.f_div_scalar_(self.world as f64);
        }
    }
}

impl Drop for Work<'_> {
    fn drop(&mut self) {
        if let Some(raw) = self.raw.take() {
            let mut err = std::ptr::null_mut();
            let ok = unsafe { ffi::sana_c10d_wait(raw.as_ptr(), 0, &mut err) } != 0;
            unsafe {
                if !ok {
                    ffi::sana_c10d_free_string(err);
                }
                ffi::sana_c10d_work_free(raw.as_ptr());
            }
            if ok {
                self.finish_avg();
            }
        }
    }
}

#[cfg(test)]
mod tests;
