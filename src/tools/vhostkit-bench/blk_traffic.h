// vhostkit-bench blk mode: random 4 KiB (--bs) reads or writes against a vhost-user-blk back-end,
// `iodepth` requests in flight per request queue, one data thread per queue. Each thread keeps
// its queue full, records each request's latency (submitted -> seen on the used ring) in a
// Histogram during the measured window, and counts requests whose status is not OK as errors.
// Steady state makes no allocation and, in busy mode, no system call except the kicks the device
// asks for (busy mode keeps call notifications off; event mode arms them only before sleeping).
#pragma once

#include <atomic>
#include <cstdint>
#include <vector>

#include "histogram.h"
#include "report.h"
#include "traffic.h"
#include "vhostkit/driver/blk_driver.h"

namespace vhostkit::bench {

// Written by one data thread (relaxed stores of running totals), read once a second.
struct alignas(64) BlkCounters {
  std::atomic<std::uint64_t> completed{0};
  std::atomic<std::uint64_t> errors{0};
  std::atomic<std::uint64_t> inflight{0};
  // Set (release) once the thread has seen the drain phase with nothing in flight: it submits
  // nothing after that, so the totals above are final. The control thread waits on this, not
  // on `inflight`, which a thread that has not yet seen the drain may be about to raise.
  std::atomic<bool> drained{false};
};

struct BlkQueueConfig {
  std::uint16_t q = 0;
  BlkRw rw = BlkRw::randread;
  std::uint32_t bs = 4096;   // bytes per request, a multiple of 512
  std::uint64_t blocks = 0;  // bs-sized blocks on the disk: offsets are uniform in [0, blocks)
  bool busy = true;
  int cpu = -1;
  std::uint64_t seed = 1;
};

// Runs queue cfg.q until ctl says done: submits while the phase is warmup or measure, keeps
// completing through drain. `hist` gets latencies (ns) of requests completed during measure.
void run_blk_queue(driver::BlkDriver& f, const BlkQueueConfig& cfg, const Control& ctl,
                   BlkCounters& out, Histogram& hist) noexcept;

struct BlkRunConfig {
  std::string label;
  BlkRw rw = BlkRw::randread;
  std::uint32_t bs = 4096;
  double duration = 10;
  double warmup = 1;
  bool busy = true;
  std::vector<int> cpus;  // data thread of queue q on cpus[q % size]; empty: unpinned
  bool live = true;       // a line a second on stderr
};

// One run over every queue of `f`: warm-up, measured window (live lines), drain, result.
// `stopped` is set when SIGINT/SIGTERM (on sigfd) cut it short.
BlkResult run_blk(driver::BlkDriver& f, const BlkRunConfig& cfg, int sigfd, bool& stopped);

}  // namespace vhostkit::bench
