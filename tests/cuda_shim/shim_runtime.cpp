// The launcher behind cuda_shim.h: runs a kernel's grid block by block, each
// block's threads as ucontext fibers switched at __syncthreads().
#include "cuda_shim.h"

#include <ucontext.h>

#include <cstdio>
#include <functional>
#include <vector>

namespace ccshim {

struct Fiber {
    ucontext_t ctx;
    dim3 tid;
    bool done = false;
    bool at_barrier = false;
    std::vector<char> stack;
};

dim3 g_block_idx{0, 0, 0}, g_block_dim{1, 1, 1}, g_grid_dim{1, 1, 1};
Fiber* g_current = nullptr;
char* g_dynamic_shared = nullptr;

static ucontext_t g_scheduler;
static const std::function<void()>* g_body = nullptr;
static char g_error[512];
static long long g_barriers = 0;  // barrier completions, for the tests' report

const dim3& thread_idx() { return g_current->tid; }

void syncthreads() {
    g_current->at_barrier = true;
    swapcontext(&g_current->ctx, &g_scheduler);
}

static void fiber_entry() {
    (*g_body)();
    g_current->done = true;
    // returning goes to uc_link: the scheduler
}

}  // namespace ccshim

using namespace ccshim;

static const size_t kStack = 256 * 1024;

// Runs body() as every thread of every block. Returns 0, or -1 with a
// message in ccshim_error() (barrier divergence, bad launch configuration).
int ccshim_run(dim3 grid, dim3 block, size_t dynamic_shared, const std::function<void()>& body) {
    g_error[0] = 0;
    const unsigned nthreads = block.x * block.y * block.z;
    if (nthreads == 0 || nthreads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
        grid.y > 65535 || grid.z > 65535) {
        std::snprintf(g_error, sizeof g_error, "invalid launch configuration grid (%u, %u, %u) block (%u, %u, %u)",
                      grid.x, grid.y, grid.z, block.x, block.y, block.z);
        return -1;
    }
    static std::vector<Fiber> fibers;
    if (fibers.size() < nthreads) fibers.resize(nthreads);
    for (unsigned i = 0; i < nthreads; ++i)
        if (fibers[i].stack.size() != kStack) fibers[i].stack.resize(kStack);
    std::vector<char> dyn(dynamic_shared + 16);
    g_dynamic_shared = dyn.data();
    g_body = &body;
    g_grid_dim = grid;
    g_block_dim = block;
    for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
    for (unsigned bx = 0; bx < grid.x; ++bx) {
        g_block_idx = dim3{bx, by, bz};
        for (unsigned i = 0; i < nthreads; ++i) {
            Fiber& f = fibers[i];
            f.tid = dim3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
            f.done = false;
            f.at_barrier = false;
            getcontext(&f.ctx);
            f.ctx.uc_stack.ss_sp = f.stack.data();
            f.ctx.uc_stack.ss_size = f.stack.size();
            f.ctx.uc_link = &g_scheduler;
            makecontext(&f.ctx, fiber_entry, 0);
        }
        // Rounds: run every live thread until it reaches the barrier or
        // returns; when all live threads wait at the barrier, release them.
        for (;;) {
            unsigned live = 0, waiting = 0, exited = 0;
            for (unsigned i = 0; i < nthreads; ++i) {
                Fiber& f = fibers[i];
                if (f.done) { ++exited; continue; }
                f.at_barrier = false;
                g_current = &f;
                swapcontext(&g_scheduler, &f.ctx);
                if (f.done) ++exited;
                else { ++live; ++waiting; }
            }
            g_current = nullptr;
            if (live == 0) break;
            if (exited > 0) {
                std::snprintf(g_error, sizeof g_error,
                              "barrier divergence in block (%u, %u, %u): %u threads wait at "
                              "__syncthreads() while %u have returned",
                              bx, by, bz, waiting, exited);
                return -1;
            }
            ++g_barriers;
        }
    }
    return 0;
}

extern "C" const char* ccshim_error() { return g_error; }
extern "C" long long ccshim_barriers() { return g_barriers; }
