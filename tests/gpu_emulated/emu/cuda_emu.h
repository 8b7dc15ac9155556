// cuda_emu.h — owns the CPU emulation of the CUDA C subset that src/gpu/kernels/*.cu use, so that g++ compiles
// those sources unchanged as C++20 (tests/gpu_emulated/emu/driver.cpp includes this header, then the .cu files).
//
// Model of execution (emu::launch): the blocks of a launch run one after another, in an order drawn from a seed
// (no kernel may depend on it). A block runs as blockDim emulated threads, each a fiber (ucontext, its own
// stack) on the launching OS thread, so all threads of a block share its __shared__ arrays (function-local
// statics) and no other block runs meanwhile. The threads take turns: exactly one runs at a time, until it
// waits at a barrier or returns, then hands over to a runnable thread picked by a seeded PRNG (a different
// interleaving per phase, the same for the same seed). So:
// - a race that a barrier should have prevented (a read before the write it needs) shows up for most seeds,
//   and results never depend on the host's scheduler;
// - a deadlock (threads waiting at barriers that can no longer fill) is detected at once;
// - a turn costs a swapcontext, not an OS thread handoff (one std::thread per emulated thread, handing turns
//   over through futexes, made these tests take about a minute on 2 cores instead of a few seconds).
// - __syncthreads(): a block barrier. A thread that returns from the kernel leaves it (as on the GPU); the
//   threads meeting at one barrier must come from the same source line and the same call count, else the
//   run fails as divergent.
// - __shfl_xor_sync(mask, v, lane_mask): a per-warp exchange (publish into the warp's slots for this call,
//   warp barrier, read the partner's slot; slots alternate between two sets, so a lane never overwrites a
//   value a slower lane has still to read), correct in loops. Only full-warp masks over 32 live lanes are
//   emulated: a lane that exited, a lane that exits while its warp shuffles, or lanes meeting at different
//   shuffles fail the run.
// - mma_tf32(d, a, b) (nf4.cu's wrapper of mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32, the tensor
//   cores): warp-collective like a shuffle (each lane publishes its A and B fragments into the warp's slots for
//   this call, warp barrier, then computes its own four D elements from the whole of A and B; the same checks
//   of full warps, exited lanes and call sites). The fragment layouts are the PTX ISA's ("Matrix Fragments for
//   mma.m16n8k8", .tf32 multiplicands, .f32 accumulators), written here as the spec gives them: lane and
//   register -> (row, column). Numerics: operands must be TF32 values (low 13 bits clear, else the run fails),
//   so every product is exact in f32; each output is D + A[i][0]·B[0][j] + ... + A[i][7]·B[7][j], summed in f32 in k
//   order. The tensor cores' own internal order and rounding of that sum may differ in the last bits (the
//   device check covers the real ones). tf32_round(v) is cvt.rna.tf32.f32 (nearest, ties away from zero) with
//   the low 13 bits cleared, computed bitwise. nf4.cu defines both with inline PTX unless LORASERVE_EMULATION,
//   which this header defines.
// - __shared__ arrays are placed in the "emu_shared" section, filled with 0xff bytes (NaN as f32) before each
//   block, so a read of shared memory no thread of the block wrote shows up as NaN. g++ (12) ignores the
//   section attribute on the statics of function template instantiations, so the kernels declare their
//   __shared__ arrays in the non-template entry points and hand them to the templates (objdump -t of the
//   driver lists every one in emu_shared).
// - uint4 / float4 copies (the kernels' vector loads `*reinterpret_cast<const uint4*>(p)`, and stores through
//   such a cast) check that source and destination are 16-byte aligned and, inside a buffer the driver
//   registered, wholly inside its data.
// - __expf(x) is computed as exp2f(x * log2(e)) in f32, the GPU intrinsic's range reduction (ex2.approx
//   itself is taken as exact: on the device it is ~2 ulp and flushes subnormals); other math maps to libm.
// - Products and sums round twice here (-ffp-contract=off); NVRTC contracts them into FMAs (fmad on:
//   src/gpu/nvrtc.rs), so only the __f*_rn sites (KV write, RoPE) are bit-exact between the two, and kernels
//   the emulator finds bit-identical to each other may differ in the last bits on the device.
// - atomicAdd on unsigned int, __threadfence() and __ldcg(p) (the split-K tensor-core launches' hand-over
//   between blocks): one thread runs at a time and blocks run one after another, so the add is a plain
//   read-modify-write, the fence does nothing and __ldcg is a load. The blocks' random order still decides
//   which block of a tile counts last and sums the partials, and __ldcg fails the run on a word whose bits
//   are all ones (the poison the tests fill scratch with, never a computed value): a block that sums before
//   the others have written their partials reads it. Not checked here: a block runs whole before the next
//   starts, so no block ever sees another's partial half-written, and a missing fence or a missing barrier
//   before the count goes unnoticed; that the fences and the L2 loads make the other SMs' partials visible
//   on the GPU is the device check's to show.
// Any failure prints "cuda_emu: ..." on stderr and exits with status 3.
#pragma once

#include <math.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <type_traits>
#include <vector>

// The kernel sources take their inline-PTX device functions from this header instead (tf32_round, mma_tf32).
#define LORASERVE_EMULATION

#define __global__
#define __device__
#define __forceinline__ inline
// __restrict__ is a GCC keyword already.
#define __shared__ static __attribute__((section("emu_shared"), aligned(16)))

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};
using uint3 = dim3;

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu {

[[noreturn]] inline void fail(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    std::fputs("cuda_emu: ", stderr);
    std::vfprintf(stderr, fmt, ap);
    std::fputc('\n', stderr);
    va_end(ap);
    std::fflush(stderr);
    std::_Exit(3);
}

struct Warp;

// One emulated thread: its context (a fiber with its own stack), indices and call counters.
struct ThreadCtx {
    ucontext_t ctx;
    dim3 idx;
    unsigned tid = 0, lane = 0;
    Warp* warp = nullptr;
    unsigned long long sync_calls = 0, shfl_calls = 0, mma_calls = 0;
};

// The block's threads and whose turn it is (all on the launching OS thread, one at a time).
struct Scheduler {
    std::vector<ThreadCtx> threads;
    ucontext_t host;              // the launching context, resumed when the block is complete
    std::vector<unsigned> ready;  // runnable threads other than the one running
    unsigned finished = 0;
    unsigned long long rng = 0;

    unsigned long long next_random() {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        return rng;
    }

    unsigned take_random() {
        const size_t i = next_random() % ready.size();
        const unsigned t = ready[i];
        ready[i] = ready.back();
        ready.pop_back();
        return t;
    }
};

inline Scheduler sched;
inline ThreadCtx* self = nullptr;  // the running thread

// Makes `t` the running thread: its indices become threadIdx, then its context resumes.
inline void switch_to(ThreadCtx& t, ucontext_t* from) {
    self = &t;
    threadIdx = t.idx;
    if (swapcontext(from, &t.ctx) != 0) fail("swapcontext failed");
}

// Hands the turn to a runnable thread and sleeps until given it back. With nobody runnable, the block can
// never finish: a deadlock.
inline void switch_away(const char* what, long site) {
    if (sched.ready.empty())
        fail("deadlock: thread %u waits in %s at line %ld and no thread of the block can run (%u of %zu returned)",
             self->tid, what, site, sched.finished, sched.threads.size());
    ThreadCtx* me = self;
    switch_to(sched.threads[sched.take_random()], &me->ctx);
}

// A reusable barrier for a fixed set of threads, any of which may leave for good (drop). Arrivals carry the
// call site and the caller's call count; all arrivals of one phase must agree.
class Barrier {
  public:
    void reset(unsigned n, const char* what, bool strict) {
        full_ = expected_ = n;
        waiters_.clear();
        what_ = what;
        strict_ = strict;
    }

    // `what` names the operation waiting (the barrier's own name if null): a warp's barrier serves its shuffles
    // and its MMAs.
    void wait(long site, unsigned long long seq, const char* what = nullptr) {
        if (what == nullptr) what = what_;
        if (strict_ && expected_ != full_)
            fail("%s at line %ld with %u of %u lanes exited (a full-warp operation over missing lanes)", what, site,
                 full_ - expected_, full_);
        if (waiters_.empty()) {
            site_ = site;
            seq_ = seq;
            site_what_ = what;
        } else if (site != site_ || seq != seq_) {
            fail("divergent %s: a thread at line %ld (its call #%llu) meets threads in %s at line %ld (call #%llu)",
                 what, site, seq, site_what_, site_, seq_);
        }
        if (waiters_.size() + 1 == expected_) {
            release();
            return;  // the last to arrive keeps its turn
        }
        waiters_.push_back(self->tid);
        switch_away(what, site);
    }

    // The calling thread leaves (returned from the kernel).
    void drop() {
        if (strict_ && !waiters_.empty())
            fail("a lane exited while its warp waits in %s at line %ld", site_what_, site_);
        --expected_;
        if (!waiters_.empty() && waiters_.size() == expected_) release();
    }

  private:
    void release() {
        sched.ready.insert(sched.ready.end(), waiters_.begin(), waiters_.end());
        waiters_.clear();
    }

    std::vector<unsigned> waiters_;
    unsigned full_ = 0, expected_ = 0;
    unsigned long long seq_ = 0;
    long site_ = -1;
    const char* what_ = "";
    const char* site_what_ = "";
    bool strict_ = false;
};

// One lane's MMA operands as published for a call: its A and B fragment registers.
struct MmaSlot {
    unsigned a[4], b[2];
};

struct Warp {
    Barrier bar;
    unsigned lanes = 0;
    unsigned long long slot[2][32] = {};  // shuffles
    MmaSlot mma[2][32] = {};              // MMAs
};

inline Barrier block_barrier;

inline void syncthreads(long site) {
    block_barrier.wait(site, self->sync_calls++);
}

template <class T>
T shfl_xor(long site, unsigned mask, T v, int lane_mask, int width = 32) {
    static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffle of a 1..8-byte value");
    Warp& w = *self->warp;
    if (mask != 0xffffffffu || width != 32 || w.lanes != 32)
        fail("__shfl_xor_sync at line %ld: only full 32-lane warps with mask 0xffffffff are emulated (mask %#x, "
             "width %d, %u lanes)",
             site, mask, width, w.lanes);
    if (lane_mask < 0 || lane_mask >= 32) fail("__shfl_xor_sync at line %ld: lane mask %d", site, lane_mask);
    const unsigned long long n = self->shfl_calls++;
    unsigned long long* slots = w.slot[n % 2];
    unsigned long long bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    slots[self->lane] = bits;
    // Every lane reads call n's slots before it arrives at call n + 1, which call n + 2's writes wait for.
    w.bar.wait(site, n);
    const unsigned long long got = slots[self->lane ^ static_cast<unsigned>(lane_mask)];
    T out;
    std::memcpy(&out, &got, sizeof(T));
    return out;
}

// --- Tensor cores: mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 ---

// Where the PTX ISA puts each fragment register of mma.m16n8k8 with .tf32 multiplicands and .f32 accumulators
// (section "Matrix Fragments for mma.m16n8k8"), transcribed as the spec states it, lane and register i ->
// (row, col), with groupID = %laneid >> 2 and threadID_in_group = %laneid % 4:
//   A (16 x 8):   row = groupID for a0 and a2, groupID + 8 for a1 and a3;
//                 col = threadID_in_group for a0 and a1, threadID_in_group + 4 for a2 and a3
//   B (8 x 8):    row = threadID_in_group for b0, threadID_in_group + 4 for b1; col = groupID
//   C/D (16 x 8): row = groupID for c0 and c1, groupID + 8 for c2 and c3;
//                 col = (threadID_in_group * 2) + (i & 0x1) for ci
struct RowCol {
    int row, col;
};

inline RowCol mma_a_at(unsigned lane, int i) {
    const int group = static_cast<int>(lane >> 2), in_group = static_cast<int>(lane % 4);
    return {(i == 0 || i == 2) ? group : group + 8, (i == 0 || i == 1) ? in_group : in_group + 4};
}

inline RowCol mma_b_at(unsigned lane, int i) {
    const int group = static_cast<int>(lane >> 2), in_group = static_cast<int>(lane % 4);
    return {i == 0 ? in_group : in_group + 4, group};
}

inline RowCol mma_cd_at(unsigned lane, int i) {
    const int group = static_cast<int>(lane >> 2), in_group = static_cast<int>(lane % 4);
    return {i < 2 ? group : group + 8, in_group * 2 + (i & 1)};
}

// The layouts above cover each element of A, B and C/D exactly once (checked once per run).
inline void check_mma_layouts() {
    static const bool checked = [] {
        int a[16][8] = {}, b[8][8] = {}, cd[16][8] = {};
        for (unsigned lane = 0; lane < 32; lane++) {
            for (int i = 0; i < 4; i++) {
                const RowCol p = mma_a_at(lane, i), q = mma_cd_at(lane, i);
                if (p.row < 0 || p.row >= 16 || p.col < 0 || p.col >= 8 || q.row < 0 || q.row >= 16 || q.col < 0 ||
                    q.col >= 8)
                    fail("mma layout: lane %u register %d outside the tile", lane, i);
                a[p.row][p.col]++;
                cd[q.row][q.col]++;
            }
            for (int i = 0; i < 2; i++) {
                const RowCol p = mma_b_at(lane, i);
                if (p.row < 0 || p.row >= 8 || p.col < 0 || p.col >= 8)
                    fail("mma layout: lane %u register b%d outside the tile", lane, i);
                b[p.row][p.col]++;
            }
        }
        for (int r = 0; r < 16; r++)
            for (int c = 0; c < 8; c++)
                if (a[r][c] != 1 || cd[r][c] != 1 || (r < 8 && b[r][c] != 1))
                    fail("mma layout: element (%d, %d) held %d/%d/%d times (A/B/D)", r, c, a[r][c], r < 8 ? b[r][c] : 1,
                         cd[r][c]);
        return true;
    }();
    (void)checked;
}

// A .tf32 operand register. The PTX ISA leaves the tf32 format's layout in a .b32 register implementation-defined
// and only promises conversions into it (cvt.rna.tf32.f32): an operand with any of the low 13 bits set was not
// converted, and fails the run.
inline float tf32_operand(long site, unsigned bits) {
    if (bits & 0x1fffu)
        fail("mma_tf32 at line %ld: operand %#010x is not a TF32 value (low 13 bits set; round it with tf32_round)",
             site, bits);
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// d = A·B + d for one warp: each lane publishes its fragments of A and B into the warp's slots for this call
// (alternating sets, as for shuffles), meets the other 31 at the warp barrier, assembles A and B whole by the
// layouts above, then computes its own D elements. Products of TF32 values (11-bit significands) are exact in
// f32; the sum runs in f32 in k order (the hardware's internal order and rounding may differ in the last bits).
inline void mma_m16n8k8_tf32(long site, float d[4], const unsigned a[4], const unsigned b[2]) {
    Warp& w = *self->warp;
    if (w.lanes != 32) fail("mma_tf32 at line %ld: a warp of %u lanes (mma.sync takes all 32)", site, w.lanes);
    check_mma_layouts();
    const unsigned long long n = self->mma_calls++;
    MmaSlot* slots = w.mma[n % 2];
    std::memcpy(slots[self->lane].a, a, sizeof slots[self->lane].a);
    std::memcpy(slots[self->lane].b, b, sizeof slots[self->lane].b);
    // Every lane reads call n's slots before it arrives at call n + 1, which call n + 2's writes wait for.
    w.bar.wait(site, n, "mma_tf32");
    float A[16][8], B[8][8];
    for (unsigned lane = 0; lane < 32; lane++) {
        for (int i = 0; i < 4; i++) {
            const RowCol p = mma_a_at(lane, i);
            A[p.row][p.col] = tf32_operand(site, slots[lane].a[i]);
        }
        for (int i = 0; i < 2; i++) {
            const RowCol p = mma_b_at(lane, i);
            B[p.row][p.col] = tf32_operand(site, slots[lane].b[i]);
        }
    }
    for (int i = 0; i < 4; i++) {
        const RowCol p = mma_cd_at(self->lane, i);
        float acc = d[i];
        for (int k = 0; k < 8; k++) acc += A[p.row][k] * B[k][p.col];
        d[i] = acc;
    }
}

// Buffers the driver allocated: [region, region_end) is the whole mapping (guards and slack included),
// [data, data + bytes) what the kernel may touch.
struct Region {
    const char *region, *region_end, *data;
    size_t bytes;
    int id;
};
inline std::vector<Region> regions;

inline void vector_access(const void* p, const char* type, const char* access) {
    const auto a = reinterpret_cast<uintptr_t>(p);
    if (a % 16 != 0)
        fail("misaligned %s %s at %p (address %% 16 = %u)", type, access, p, static_cast<unsigned>(a % 16));
    const char* c = static_cast<const char*>(p);
    for (const Region& r : regions) {
        if (c >= r.region && c < r.region_end && (c < r.data || c + 16 > r.data + r.bytes))
            fail("%s %s at byte offset %lld of buffer %d, which holds %zu bytes", type, access,
                 static_cast<long long>(c - r.data), r.id, r.bytes);
    }
}
inline void vector_load(const void* p, const char* type) { vector_access(p, type, "load"); }

}  // namespace emu

#define __syncthreads() ::emu::syncthreads(__LINE__)
#define __shfl_xor_sync(...) ::emu::shfl_xor(__LINE__, __VA_ARGS__)
// nf4.cu's inline-PTX wrapper of mma.sync m16n8k8 (TF32), see emu::mma_m16n8k8_tf32.
#define mma_tf32(d, a, b) ::emu::mma_m16n8k8_tf32(__LINE__, d, a, b)

// nf4.cu's cvt.rna.tf32.f32 then `& 0xffffe000`: the magnitude rounded to 10 explicit mantissa bits, to nearest
// with ties away from zero (add half an ulp of TF32 to the bits, then clear the low 13; a carry into the
// exponent is the right result, up to the overflow of values past the largest TF32 to infinity), subnormals
// alike. Infinities are kept and a NaN stays a NaN.
inline unsigned int tf32_round(float v) {
    unsigned bits;
    std::memcpy(&bits, &v, 4);
    if ((bits & 0x7f800000u) == 0x7f800000u) return (bits & 0x7fffffu) ? (bits | 0x400000u) & 0xffffe000u : bits;
    return (bits + 0x1000u) & 0xffffe000u;
}

struct alignas(16) uint4 {
    unsigned int x, y, z, w;
    uint4() = default;
    uint4(const uint4& o) {
        emu::vector_load(&o, "uint4");
        std::memcpy(static_cast<void*>(this), &o, 16);
    }
    // `*dst = *src` and `v = *src` (no copy constructor runs): both sides are checked.
    uint4& operator=(const uint4& o) {
        emu::vector_load(&o, "uint4");
        emu::vector_access(this, "uint4", "store");
        std::memcpy(static_cast<void*>(this), &o, 16);
        return *this;
    }
};

struct alignas(16) float4 {
    float x, y, z, w;
    float4() = default;
    float4(const float4& o) {
        emu::vector_load(&o, "float4");
        std::memcpy(static_cast<void*>(this), &o, 16);
    }
    // `*dst = *src` and `v = *src` (no copy constructor runs): both sides are checked.
    float4& operator=(const float4& o) {
        emu::vector_load(&o, "float4");
        emu::vector_access(this, "float4", "store");
        std::memcpy(static_cast<void*>(this), &o, 16);
        return *this;
    }
};

inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline float __uint_as_float(unsigned int u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline int __float_as_int(float f) {
    int i;
    std::memcpy(&i, &f, 4);
    return i;
}
inline float __expf(float x) { return exp2f(x * 1.44269504088896341f); }
// Round-to-nearest f32 arithmetic, never fused into a multiply-add: the driver is built with
// -ffp-contract=off (tests/gpu_emulated/emu/mod.rs), without which g++ fuses a*b - c*d on FMA-capable targets.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) {
    const unsigned int old = *p;
    *p = old + v;
    return old;
}
inline void __threadfence() {}
inline float __ldcg(const float* p) {
    unsigned int bits;
    std::memcpy(&bits, p, 4);
    if (bits == 0xffffffffu) emu::fail("__ldcg of an unwritten word at %p (all bits set: the scratch's poison)", p);
    return *p;
}

// The __shared__ section's bounds (weak: a translation unit without shared arrays has none).
extern "C" char __start_emu_shared[] __attribute__((weak));
extern "C" char __stop_emu_shared[] __attribute__((weak));

namespace emu {

inline const std::function<void()>* kernel_fn = nullptr;

// A thread's life in one block: run the kernel, leave the barriers, hand over the turn.
inline void thread_entry() {
    (*kernel_fn)();
    self->warp->bar.drop();
    block_barrier.drop();
    ThreadCtx* me = self;
    if (++sched.finished == sched.threads.size()) {
        self = nullptr;
        if (swapcontext(&me->ctx, &sched.host) != 0) fail("swapcontext failed");
    } else {
        if (sched.ready.empty())
            fail("deadlock: thread %u returned, %zu of %zu threads wait at barriers that cannot fill", me->tid,
                 sched.threads.size() - sched.finished, sched.threads.size());
        switch_to(sched.threads[sched.take_random()], &me->ctx);
    }
    fail("thread %u resumed after returning", me->tid);
}

// A fresh context for `c` that starts in thread_entry (apart, so that getcontext's second return, which
// never happens here, cannot clobber the launch loop's variables).
__attribute__((noinline)) inline void start_context(ThreadCtx& c, char* stack, size_t size) {
    if (getcontext(&c.ctx) != 0) fail("getcontext failed");
    c.ctx.uc_stack.ss_sp = stack;
    c.ctx.uc_stack.ss_size = size;
    c.ctx.uc_link = nullptr;
    makecontext(&c.ctx, thread_entry, 0);
}

// Runs `kernel` over `grid` x `block`: blocks one at a time in an order drawn from `seed`, each as block-size
// threads interleaved at barriers in an order drawn from `seed`.
inline void launch(dim3 grid, dim3 block, const std::function<void()>& kernel, unsigned long long seed) {
    const unsigned threads = block.x * block.y * block.z;
    if (threads == 0 || threads > 1024) fail("block of %u threads (1..1024)", threads);
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
        fail("grid (%u, %u, %u) outside CUDA's limits", grid.x, grid.y, grid.z);
    // Each thread's stack above a PROT_NONE guard page, so an overflow faults instead of corrupting a neighbour.
    constexpr size_t GUARD = 4096, STACK = 256 * 1024;
    char* stacks = static_cast<char*>(mmap(nullptr, (GUARD + STACK) * threads, PROT_READ | PROT_WRITE,
                                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (stacks == MAP_FAILED) fail("cannot map %u thread stacks", threads);
    for (unsigned t = 0; t < threads; t++)
        if (mprotect(stacks + (GUARD + STACK) * t, GUARD, PROT_NONE) != 0) fail("mprotect failed");
    std::vector<Warp> warps((threads + 31) / 32);
    sched.threads = std::vector<ThreadCtx>(threads);
    sched.rng = seed * 0x9E3779B97F4A7C15ull | 1;
    kernel_fn = &kernel;
    blockDim = block;
    gridDim = grid;
    // The blocks in an order drawn from the seed too: no kernel may depend on the order blocks run in.
    std::vector<dim3> order;
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) order.push_back(dim3{x, y, z});
    for (size_t i = order.size(); i > 1; i--) std::swap(order[i - 1], order[sched.next_random() % i]);
    for (const dim3& b : order) {
        if (__start_emu_shared != nullptr)
            std::memset(__start_emu_shared, 0xff, static_cast<size_t>(__stop_emu_shared - __start_emu_shared));
        block_barrier.reset(threads, "__syncthreads", false);
        for (size_t w = 0; w < warps.size(); w++) {
            warps[w].lanes = std::min(32u, threads - 32 * static_cast<unsigned>(w));
            warps[w].bar.reset(warps[w].lanes, "__shfl_xor_sync", true);
            std::memset(warps[w].slot, 0xff, sizeof warps[w].slot);
            std::memset(warps[w].mma, 0xff, sizeof warps[w].mma);
        }
        blockIdx = b;
        sched.finished = 0;
        sched.ready.clear();
        for (unsigned t = 0; t < threads; t++) {
            ThreadCtx& c = sched.threads[t];
            c.idx = dim3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            c.tid = t;
            c.lane = t % 32;
            c.warp = &warps[t / 32];
            c.sync_calls = c.shfl_calls = c.mma_calls = 0;
            start_context(c, stacks + (GUARD + STACK) * t + GUARD, STACK);
            sched.ready.push_back(t);
        }
        switch_to(sched.threads[sched.take_random()], &sched.host);
    }
    munmap(stacks, (GUARD + STACK) * threads);
}

}  // namespace emu
