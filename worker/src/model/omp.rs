//! Running a closure on every thread of libtorch's OpenMP team, for the CPU decode kernels
//! (`matvec.rs`, `attend.rs`).

use std::any::Any;
use std::marker::PhantomData;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::{Mutex, OnceLock};

/// Runs `body(thread, threads)` on every thread of libtorch's OpenMP team (libgomp, which
/// libtorch loads; its size follows `tch::set_num_threads`), or once on this thread where that
/// library is not found. Running on torch's own threads matters: between torch ops they spin
/// waiting for the next parallel region, and any other pool would compete with them for the cores.
/// A panic in `body` on any thread is raised again here, after the region, where the caller's
/// `catch_unwind` sees it (unwinding out of the region itself would abort the process).
pub(crate) fn on_torch_threads(body: &(dyn Fn(usize, usize) + Sync)) {
    let Some(omp) = Omp::get() else { return body(0, 1) };
    struct Region<'a> {
        body: &'a (dyn Fn(usize, usize) + Sync),
        panic: Mutex<Option<Box<dyn Any + Send>>>,
    }
    extern "C" fn run(data: *mut std::ffi::c_void) {
        // SAFETY: `data` is the `Region` below, alive until GOMP_parallel returns.
        let region = unsafe { &*(data as *const Region) };
        let omp = Omp::get().expect("found before the parallel region");
        // SAFETY: libgomp's own queries, called inside its parallel region.
        let (thread, threads) = unsafe { ((omp.thread_num)(), (omp.num_threads)()) };
        if let Err(panic) = catch_unwind(AssertUnwindSafe(|| (region.body)(thread.max(0) as usize, threads.max(1) as usize))) {
            region.panic.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(panic);
        }
    }
    let region = Region { body, panic: Mutex::new(None) };
    // SAFETY: GOMP_parallel(fn, data, 0 = the default team size, 0 = no flags) runs `run` on every
    // thread of the team and returns when all are done; `region` outlives it.
    unsafe { (omp.parallel)(run, &region as *const Region as *mut std::ffi::c_void, 0, 0) }
    if let Some(panic) = region.panic.into_inner().unwrap_or_else(|e| e.into_inner()) {
        resume_unwind(panic);
    }
}

/// libgomp's entry points, looked up in the running process.
struct Omp {
    parallel: ParallelFn,
    thread_num: QueryFn,
    num_threads: QueryFn,
}

/// `GOMP_parallel(fn, data, num_threads, flags)`.
type ParallelFn = unsafe extern "C" fn(extern "C" fn(*mut std::ffi::c_void), *mut std::ffi::c_void, u32, u32);
/// `omp_get_thread_num()`, `omp_get_num_threads()`.
type QueryFn = unsafe extern "C" fn() -> i32;

impl Omp {
    fn get() -> Option<&'static Omp> {
        static OMP: OnceLock<Option<Omp>> = OnceLock::new();
        OMP.get_or_init(|| {
            let find = |name: &std::ffi::CStr| {
                // SAFETY: dlsym over the symbols already loaded into this process.
                let symbol = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
                (!symbol.is_null()).then_some(symbol)
            };
            let (parallel, thread_num, num_threads) =
                (find(c"GOMP_parallel")?, find(c"omp_get_thread_num")?, find(c"omp_get_num_threads")?);
            // SAFETY: libgomp's documented ABI for these three symbols.
            unsafe {
                Some(Omp {
                    parallel: std::mem::transmute::<*mut std::ffi::c_void, ParallelFn>(parallel),
                    thread_num: std::mem::transmute::<*mut std::ffi::c_void, QueryFn>(thread_num),
                    num_threads: std::mem::transmute::<*mut std::ffi::c_void, QueryFn>(num_threads),
                })
            }
        })
        .as_ref()
    }
}

/// An output buffer's base pointer, shared by the team's threads, each writing its own elements.
pub(crate) struct SharedOut<'a>(*mut f32, PhantomData<&'a mut [f32]>);
// SAFETY: threads write disjoint elements through it, and all of them finish inside the parallel
// region, while the buffer it came from stays borrowed (the lifetime).
unsafe impl Sync for SharedOut<'_> {}

impl<'a> SharedOut<'a> {
    pub(crate) fn new(out: &'a mut [f32]) -> Self {
        Self(out.as_mut_ptr(), PhantomData)
    }

    pub(crate) fn get(&self) -> *mut f32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_on_any_team_thread_reaches_the_caller_and_the_team_goes_on() {
        let _ = tch::Tensor::zeros([1], (tch::Kind::Float, tch::Device::Cpu)); // libtorch (and libgomp) loaded
        let caught = catch_unwind(|| on_torch_threads(&|thread, threads| assert!(thread + 1 < threads, "the last thread fails")));
        let message = caught.expect_err("the panic reached the caller");
        let text = message.downcast_ref::<&str>().map(|m| m.to_string()).or_else(|| message.downcast_ref::<String>().cloned());
        assert_eq!(text.as_deref(), Some("the last thread fails"));
        let ran = std::sync::atomic::AtomicUsize::new(0);
        on_torch_threads(&|_, _| {
            ran.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        });
        assert!(ran.into_inner() >= 1);
    }
}
