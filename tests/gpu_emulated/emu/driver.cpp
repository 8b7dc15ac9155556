// driver.cpp — owns one emulated kernel launch for tests/gpu_emulated/: compiles src/gpu/kernels/*.cu under
// cuda_emu.h, reads a launch file, runs the named kernel on the CPU and writes the buffers back. Also holds
// `selftest_*` kernels: deliberately broken ones that show the emulation's checks failing, and two that expose the
// emulated tensor-core primitives (mma_tf32, tf32_round) to the tests on their own.
//
// Usage: driver LAUNCH_FILE. The launch file is text, one directive a line, in this order:
//   kernel NAME                      one of the kernels registered below
//   grid X Y Z / block X Y Z
//   seed N                           (optional) the seed of the threads' interleaving, see cuda_emu.h; default 1
//   buffer ID DTYPE PATH MISALIGN    ID = 0, 1, 2, ... in order; DTYPE f32 | u8 | i32 | u32 | u64; PATH raw little-endian
//                                    bytes; the data starts MISALIGN bytes past a 16-byte boundary (0 normally)
//   table ID BUF...                  a u64 buffer holding the device addresses of buffers BUF... (LoRA's tables)
//   arg buf ID | arg i32 V | arg f32 HEXBITS    the kernel's arguments, in signature order
// Arguments are checked against the kernel's C++ signature: count, scalar types, and each pointer's element type
// against its buffer's DTYPE. After the launch every `buffer` is written to PATH.out; a buffer never passed
// through a non-const pointer must come back unchanged.
//
// Each buffer sits at the end of its own mapping (16-byte aligned unless MISALIGN), followed by a PROT_NONE
// guard page (and preceded by one): reading or writing past its end faults (reported as out of bounds); the
// slack bytes around the data (a page or more before, under 16 after) hold 0xff (NaN as f32) and must still
// hold it after the launch. Exit status: 0 done, 3 a failed check (cuda_emu.h), 4 a fault, 5 an endless launch.
#include "cuda_emu.h"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <string>
#include <tuple>

#include "../../../src/gpu/kernels/attention.cu"
#include "../../../src/gpu/kernels/fused.cu"
#include "../../../src/gpu/kernels/lora.cu"
#include "../../../src/gpu/kernels/nf4.cu"
#include "../../../src/gpu/kernels/sample.cu"

// Deliberately broken kernels, launched by the harness's own test to show that each check fires.
extern "C" __global__ void selftest_shared_race(float* out, int sync) {
    __shared__ float s[1024];
    s[threadIdx.x] = static_cast<float>(threadIdx.x);
    if (sync) __syncthreads();  // without it, a thread may read its neighbour's slot before it is written
    out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

extern "C" __global__ void selftest_divergent_sync(float* out) {
    if (threadIdx.x < 32) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1.f;
}

extern "C" __global__ void selftest_shuffle_after_exit(float* out) {
    if (threadIdx.x % 32 == 5) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

extern "C" __global__ void selftest_deadlock(float* out) {
    float v = 1.f;
    if (threadIdx.x == 0) {
        __syncthreads();
    } else {
        v = __shfl_xor_sync(0xffffffffu, v, 1);
    }
    out[threadIdx.x] = v;
}

// One warp: D = C + reps·A·B through `reps` chained mma_tf32 calls on one 16x8x8 tile. A (16 x 8), B (8 x 8)
// and C (16 x 8) are row-major and must hold TF32 values; each lane takes its fragments as the PTX ISA lays them
// out for m16n8k8 .tf32 (g = lane / 4, t = lane % 4): a = {A[g][t], A[g+8][t], A[g][t+4], A[g+8][t+4]},
// b = {B[t][g], B[t+4][g]}, c/d = {D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1]}.
extern "C" __global__ void selftest_mma(const float* a, const float* b, const float* c, float* d, int reps) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const unsigned int fa[4] = {__float_as_uint(a[g * 8 + t]), __float_as_uint(a[(g + 8) * 8 + t]),
                                __float_as_uint(a[g * 8 + t + 4]), __float_as_uint(a[(g + 8) * 8 + t + 4])};
    const unsigned int fb[2] = {__float_as_uint(b[t * 8 + g]), __float_as_uint(b[(t + 4) * 8 + g])};
    const int at[4] = {g * 8 + 2 * t, g * 8 + 2 * t + 1, (g + 8) * 8 + 2 * t, (g + 8) * 8 + 2 * t + 1};
    float acc[4];
    for (int i = 0; i < 4; i++) acc[i] = c[at[i]];
    for (int r = 0; r < reps; r++) mma_tf32(acc, fa, fb);
    for (int i = 0; i < 4; i++) d[at[i]] = acc[i];
}

// tf32_round and the hi/lo split of nf4.cu's 3xTF32: out[2i] = hi = tf32_round(v[i]), out[2i+1] =
// tf32_round(v[i] - hi), as floats.
extern "C" __global__ void selftest_tf32_split(const float* v, float* out, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const unsigned int hi = tf32_round(v[i]);
    out[2 * i] = __uint_as_float(hi);
    out[2 * i + 1] = __uint_as_float(tf32_round(v[i] - __uint_as_float(hi)));
}

// Broken uses of the warp-collective MMA: mode 0, a lane returns before its warp's MMA; mode 1, the warp's two
// halves reach MMAs on different lines; mode 2, an operand passed as raw f32 bits, not rounded to TF32.
extern "C" __global__ void selftest_mma_misuse(float* out, int mode) {
    float d[4] = {0.f, 0.f, 0.f, 0.f};
    const unsigned int a[4] = {0u, 0u, 0u, mode == 2 ? __float_as_uint(0.1f) : 0u}, b[2] = {0u, 0u};
    if (mode == 0) {
        if (threadIdx.x % 32 == 5) return;
        mma_tf32(d, a, b);
    } else if (mode == 2 || threadIdx.x % 32 < 16) {
        mma_tf32(d, a, b);
    } else {
        mma_tf32(d, a, b);
    }
    out[threadIdx.x] = d[0];
}

namespace {

constexpr size_t PAGE = 4096;

struct Buffer {
    std::string dtype, path;  // path empty: a table
    size_t bytes = 0;
    char* region = nullptr;
    size_t region_len = 0;
    char* data = nullptr;
    std::vector<char> original;
    bool written = false;  // passed through a non-const pointer
};

std::vector<Buffer> buffers;

struct Arg {
    std::string kind, value;
};

size_t elem_size(const std::string& dtype) {
    if (dtype == "f32" || dtype == "i32" || dtype == "u32") return 4;
    if (dtype == "u8") return 1;
    if (dtype == "u64") return 8;
    emu::fail("unknown dtype %s", dtype.c_str());
}

Buffer& allocate(const std::string& dtype, size_t bytes, size_t misalign) {
    if (misalign >= 16) emu::fail("misalign %zu (0..15)", misalign);
    if (bytes % elem_size(dtype) != 0) emu::fail("%zu bytes is not a whole number of %s", bytes, dtype.c_str());
    Buffer b;
    b.dtype = dtype;
    b.bytes = bytes;
    const size_t span = (bytes + misalign + 15) / 16 * 16;
    const size_t data_pages = (span + PAGE - 1) / PAGE + 1;  // at least one page of slack before the data
    b.region_len = (data_pages + 2) * PAGE;
    void* m = mmap(nullptr, b.region_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) emu::fail("mmap of %zu bytes failed", b.region_len);
    b.region = static_cast<char*>(m);
    if (mprotect(b.region, PAGE, PROT_NONE) != 0 || mprotect(b.region + (data_pages + 1) * PAGE, PAGE, PROT_NONE) != 0)
        emu::fail("mprotect failed");
    std::memset(b.region + PAGE, 0xff, data_pages * PAGE);
    b.data = b.region + (data_pages + 1) * PAGE - span + misalign;
    buffers.push_back(std::move(b));
    Buffer& r = buffers.back();
    return r;
}

std::vector<char> read_file(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) emu::fail("cannot read %s", path.c_str());
    return std::vector<char>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

// --- Arguments, converted by the kernel's parameter types. ---

struct Binder {
    const std::vector<Arg>& args;
    const char* kernel;
    size_t next = 0;

    const Arg& take(const char* want) {
        const size_t i = next++;
        if (args[i].kind != want)
            emu::fail("%s: argument %zu is `%s`, the kernel takes %s there", kernel, i, args[i].kind.c_str(), want);
        return args[i];
    }
};

template <class T>
const char* dtype_of() {
    using U = std::remove_const_t<T>;
    if constexpr (std::is_same_v<U, float>) return "f32";
    if constexpr (std::is_same_v<U, unsigned char>) return "u8";
    if constexpr (std::is_same_v<U, int>) return "i32";
    if constexpr (std::is_same_v<U, unsigned int>) return "u32";
    if constexpr (std::is_same_v<U, unsigned long long>) return "u64";
    static_assert(std::is_same_v<U, float> || std::is_same_v<U, unsigned char> || std::is_same_v<U, int> ||
                      std::is_same_v<U, unsigned int> || std::is_same_v<U, unsigned long long>,
                  "pointer parameter of an unsupported element type");
    return "";
}

template <class P>
P convert(Binder& b) {
    if constexpr (std::is_pointer_v<P>) {
        using T = std::remove_pointer_t<P>;
        const size_t i = b.next;
        const Arg& a = b.take("buf");
        const size_t id = std::stoul(a.value);
        if (id >= buffers.size()) emu::fail("%s: argument %zu names buffer %zu, undefined", b.kernel, i, id);
        Buffer& buf = buffers[id];
        if (buf.dtype != dtype_of<T>())
            emu::fail("%s: argument %zu takes %s elements, buffer %zu holds %s", b.kernel, i, dtype_of<T>(), id,
                      buf.dtype.c_str());
        if (!std::is_const_v<T>) buf.written = true;
        return reinterpret_cast<P>(buf.data);
    } else if constexpr (std::is_same_v<P, int>) {
        return static_cast<int>(std::stol(b.take("i32").value));
    } else if constexpr (std::is_same_v<P, float>) {
        const unsigned bits = static_cast<unsigned>(std::stoul(b.take("f32").value, nullptr, 16));
        float f;
        std::memcpy(&f, &bits, 4);
        return f;
    } else {
        static_assert(std::is_pointer_v<P> || std::is_same_v<P, int> || std::is_same_v<P, float>,
                      "kernel parameter of an unsupported type");
    }
}

template <class... A>
std::function<void()> bind_kernel(void (*f)(A...), const char* name, const std::vector<Arg>& args) {
    if (args.size() != sizeof...(A))
        emu::fail("%s takes %zu arguments, the launch file gives %zu", name, sizeof...(A), args.size());
    Binder b{args, name};
    std::tuple<A...> values{convert<A>(b)...};  // braced init: evaluated left to right
    return [f, values] { std::apply(f, values); };
}

using Bound = std::function<std::function<void()>(const std::vector<Arg>&)>;

#define KERNEL(name) {#name, [](const std::vector<Arg>& a) { return bind_kernel(&name, #name, a); }}
const std::map<std::string, Bound> KERNELS = {
    KERNEL(nf4_gemv_r1),
    KERNEL(nf4_gemv_r2),
    KERNEL(nf4_gemv_r4),
    KERNEL(nf4_gemv_r8),
    KERNEL(nf4_matmul_mma16),
    KERNEL(nf4_matmul_mma32),
    KERNEL(nf4_matmul_generic),
    KERNEL(lora_shrink),
    KERNEL(lora_expand),
    KERNEL(kv_write),
    KERNEL(paged_attention_g1_d64),
    KERNEL(paged_attention_g1_d128),
    KERNEL(paged_attention_g1_d256),
    KERNEL(paged_attention_g2_d64),
    KERNEL(paged_attention_g2_d128),
    KERNEL(paged_attention_g2_d256),
    KERNEL(paged_attention_g4_d64),
    KERNEL(paged_attention_g4_d128),
    KERNEL(paged_attention_g4_d256),
    KERNEL(paged_attention_g8_d64),
    KERNEL(paged_attention_g8_d128),
    KERNEL(paged_attention_g8_d256),
    KERNEL(argmax_rows),
    KERNEL(add_rms_norm),
    KERNEL(silu_mul),
    KERNEL(selftest_shared_race),
    KERNEL(selftest_divergent_sync),
    KERNEL(selftest_shuffle_after_exit),
    KERNEL(selftest_deadlock),
    KERNEL(selftest_mma),
    KERNEL(selftest_tf32_split),
    KERNEL(selftest_mma_misuse),
};

// A fault inside a buffer's mapping is an out-of-bounds access of that buffer.
void on_fault(int sig, siginfo_t* info, void*) {
    const char* a = static_cast<const char*>(info->si_addr);
    char msg[256];
    int len = std::snprintf(msg, sizeof msg, "cuda_emu: signal %d at address %p", sig, info->si_addr);
    for (size_t i = 0; i < buffers.size(); i++) {
        const Buffer& b = buffers[i];
        if (a >= b.region && a < b.region + b.region_len)
            len = std::snprintf(msg, sizeof msg,
                                "cuda_emu: out-of-bounds access of buffer %zu (%zu bytes) at byte offset %lld", i,
                                b.bytes, static_cast<long long>(a - b.data));
    }
    if (len > 0) {
        ssize_t ignored = write(2, msg, std::strlen(msg));
        ignored = write(2, "\n", 1);
        (void)ignored;
    }
    _exit(4);
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) emu::fail("usage: driver LAUNCH_FILE");
    // Faults are reported on a stack of their own (an emulated thread's stack may be the one that overflowed).
    static char alt_stack[64 * 1024];
    stack_t ss = {};
    ss.ss_sp = alt_stack;
    ss.ss_size = sizeof alt_stack;
    sigaltstack(&ss, nullptr);
    struct sigaction sa = {};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigaction(SIGSEGV, &sa, nullptr);
    sigaction(SIGBUS, &sa, nullptr);
    // A kernel that never finishes (an endless loop) must not hang the test run.
    signal(SIGALRM, [](int) {
        const char msg[] = "cuda_emu: the launch still runs after 120 s (an endless loop?)\n";
        ssize_t ignored = write(2, msg, sizeof msg - 1);
        (void)ignored;
        _exit(5);
    });
    alarm(120);

    std::ifstream in(argv[1]);
    if (!in) emu::fail("cannot read %s", argv[1]);
    std::string line, kernel;
    dim3 grid{0, 0, 0}, block{0, 0, 0};
    unsigned long long seed = 1;
    std::vector<Arg> args;
    while (std::getline(in, line)) {
        std::istringstream ls(line);
        std::string word;
        if (!(ls >> word)) continue;
        if (word == "kernel") {
            ls >> kernel;
        } else if (word == "grid") {
            ls >> grid.x >> grid.y >> grid.z;
        } else if (word == "block") {
            ls >> block.x >> block.y >> block.z;
        } else if (word == "seed") {
            ls >> seed;
        } else if (word == "buffer" || word == "table") {
            size_t id;
            ls >> id;
            if (id != buffers.size()) emu::fail("buffer %zu defined out of order", id);
            if (word == "buffer") {
                std::string dtype, path;
                size_t misalign = 0;
                ls >> dtype >> path >> misalign;
                const std::vector<char> bytes = read_file(path);
                Buffer& b = allocate(dtype, bytes.size(), misalign);
                if (!bytes.empty()) std::memcpy(b.data, bytes.data(), bytes.size());
                b.path = path;
            } else {
                std::vector<unsigned long long> addresses;
                size_t target;
                while (ls >> target) {
                    if (target >= buffers.size()) emu::fail("table %zu names buffer %zu, undefined", id, target);
                    addresses.push_back(reinterpret_cast<unsigned long long>(buffers[target].data));
                }
                if (!ls.eof()) emu::fail("malformed line: %s", line.c_str());
                Buffer& b = allocate("u64", 8 * addresses.size(), 0);
                if (!addresses.empty()) std::memcpy(b.data, addresses.data(), 8 * addresses.size());
                continue;
            }
            if (ls.fail()) emu::fail("malformed line: %s", line.c_str());
        } else if (word == "arg") {
            Arg a;
            ls >> a.kind >> a.value;
            if (ls.fail()) emu::fail("malformed line: %s", line.c_str());
            args.push_back(a);
        } else {
            emu::fail("unknown directive: %s", line.c_str());
        }
    }
    const auto k = KERNELS.find(kernel);
    if (k == KERNELS.end()) emu::fail("unknown kernel `%s`", kernel.c_str());
    const std::function<void()> run = k->second(args);

    for (size_t i = 0; i < buffers.size(); i++) {
        Buffer& b = buffers[i];
        b.original.assign(b.data, b.data + b.bytes);
        emu::regions.push_back({b.region, b.region + b.region_len, b.data, b.bytes, static_cast<int>(i)});
    }
    emu::launch(grid, block, run, seed);

    for (size_t i = 0; i < buffers.size(); i++) {
        const Buffer& b = buffers[i];
        for (const char* p = b.region + PAGE; p < b.region + b.region_len - PAGE; p++) {
            if ((p < b.data || p >= b.data + b.bytes) && static_cast<unsigned char>(*p) != 0xff)
                emu::fail("out-of-bounds write to buffer %zu (%zu bytes) at byte offset %lld", i, b.bytes,
                          static_cast<long long>(p - b.data));
        }
        if (!b.written && std::memcmp(b.original.data(), b.data, b.bytes) != 0)
            emu::fail("buffer %zu changed, but the kernel only gets it through a const pointer", i);
        if (b.path.empty()) continue;
        std::ofstream out(b.path + ".out", std::ios::binary);
        out.write(b.data, static_cast<std::streamsize>(b.bytes));
        if (!out) emu::fail("cannot write %s.out", b.path.c_str());
    }
    return 0;
}
