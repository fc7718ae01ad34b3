//! Running a closure on every thread of libtorch's OpenMP team, for the CPU decode kernels
//! (`matvec.rs`, `attend.rs`).

use std::sync::OnceLock;

/// Runs `body(thread, threads)` on every thread of libtorch's OpenMP team (libgomp, which
/// libtorch loads; its size follows `tch::set_num_threads`), or once on this thread where that
/// library is not found. Running on torch's own threads matters: between torch ops they spin
/// waiting for the next parallel region, and any other pool would compete with them for the cores.
pub(crate) fn on_torch_threads(body: &(dyn Fn(usize, usize) + Sync)) {
    let Some(omp) = Omp::get() else { return body(0, 1) };
    extern "C" fn run(data: *mut std::ffi::c_void) {
        // SAFETY: `data` is the `&dyn Fn` below, alive until GOMP_parallel returns.
        let body = unsafe { &*(data as *const &(dyn Fn(usize, usize) + Sync)) };
        let omp = Omp::get().expect("found before the parallel region");
        // SAFETY: libgomp's own queries, called inside its parallel region.
        let (thread, threads) = unsafe { ((omp.thread_num)(), (omp.num_threads)()) };
        body(thread.max(0) as usize, threads.max(1) as usize);
    }
    // SAFETY: GOMP_parallel(fn, data, 0 = the default team size, 0 = no flags) runs `run` on every
    // thread of the team and returns when all are done; `body` outlives it.
    unsafe { (omp.parallel)(run, &body as *const _ as *mut std::ffi::c_void, 0, 0) }
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
pub(crate) struct SharedOut(*mut f32);
// SAFETY: threads write disjoint elements through it, and all of them finish inside the parallel
// region, while the buffer it came from is borrowed.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    pub(crate) fn new(out: &mut [f32]) -> Self {
        Self(out.as_mut_ptr())
    }

    pub(crate) fn get(&self) -> *mut f32 {
        self.0
    }
}
