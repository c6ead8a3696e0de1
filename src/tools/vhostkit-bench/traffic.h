// The data thread of one queue pair: puts frames on the transmitq, takes them off the receiveq,
// and counts, in one of the four modes. Steady state makes no allocation and, in busy mode, no
// system call; in event mode it sleeps in poll() on the call eventfds only when there is
// nothing to do (NAPI style: call notifications are off while it works and armed before it
// sleeps).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <vector>

#include "histogram.h"
#include "report.h"
#include "vhostkit/driver/net_driver.h"

namespace vhostkit::bench {

// What the control thread tells the data threads; read with relaxed loads once per iteration.
enum class Phase : int {
  warmup,   // traffic flows, latency samples are not recorded
  measure,  // the measured window: latency samples are recorded
  drain,    // no new frames are sent; whatever comes back is still received and counted
  done,     // return
};

struct Control {
  std::atomic<int> phase{static_cast<int>(Phase::warmup)};
  Phase get() const noexcept { return static_cast<Phase>(phase.load(std::memory_order_relaxed)); }
  void set(Phase p) noexcept { phase.store(static_cast<int>(p), std::memory_order_relaxed); }
};

// Written by one data thread (plain relaxed stores of running totals), read by the control
// thread once a second. Each pair's counters sit on their own cache line.
struct alignas(64) PairCounters {
  std::atomic<std::uint64_t> tx{0};
  std::atomic<std::uint64_t> rx{0};
  std::atomic<std::uint64_t> tx_outstanding{0};  // chains on the transmitq not yet reclaimed
  std::atomic<std::uint64_t> late{0};            // latency: replies that came after their timeout
  // Set (release) once the thread has seen the drain phase and stored its totals: it sends
  // nothing after that. The control thread compares rx with tx only then; before, a thread
  // that has not yet seen the drain may be about to send another burst.
  std::atomic<bool> draining{false};
};

struct PairConfig {
  Mode mode = Mode::loop;
  std::uint16_t qp = 0;
  std::uint32_t size = 64;
  std::uint32_t burst = 32;
  bool busy = true;
  int cpu = -1;  // pin the thread here; -1: leave it
  // latency: a reply not back by then is counted lost and the next probe goes out
  std::chrono::milliseconds reply_timeout{200};
};

// The frame we send: an Ethernet header (locally administered MACs, ethertype 0x88b5, IEEE's
// local experimental type), our magic, a sequence number and the send time in ns.
inline constexpr std::uint32_t kMagic = 0x766b626eu;  // "vkbn"
inline constexpr std::size_t kMinFrame = 60;
std::size_t write_frame(std::span<std::uint8_t> room, std::size_t len, std::uint64_t seq,
                        std::uint64_t t_ns) noexcept;
// Reads seq and time back from a frame of ours; false if it is someone else's.
bool read_frame(std::span<const std::uint8_t> f, std::uint64_t& seq, std::uint64_t& t_ns) noexcept;

std::uint64_t now_ns() noexcept;

// Seconds from t to now (steady clock): the control threads' measuring and drain windows.
inline double seconds_since(std::chrono::steady_clock::time_point t) noexcept {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}
// Pins the calling thread to `cpu` (-1: leaves it).
void pin_to(int cpu) noexcept;
// A spin-wait hint to the CPU (PAUSE on x86).
void cpu_relax() noexcept;

// Merges the data threads' histograms (ns) into the latency fields (us) of a RunResult or a
// BlkResult.
template <typename Result>
void set_latency(Result& r, const std::vector<std::unique_ptr<Histogram>>& hists) {
  Histogram h;
  for (const auto& x : hists) h.merge(*x);
  r.samples = h.count();
  r.p50_us = static_cast<double>(h.percentile(0.50)) / 1e3;
  r.p99_us = static_cast<double>(h.percentile(0.99)) / 1e3;
  r.p999_us = static_cast<double>(h.percentile(0.999)) / 1e3;
  r.min_us = static_cast<double>(h.min()) / 1e3;
  r.max_us = static_cast<double>(h.max()) / 1e3;
  r.mean_us = h.mean() / 1e3;
}

// Runs the pair's loop until ctl says done. `hist` receives round-trip times (ns) in latency
// mode during Phase::measure.
void run_pair(driver::NetDriver& s, const PairConfig& cfg, const Control& ctl, PairCounters& out,
              Histogram& hist) noexcept;

}  // namespace vhostkit::bench
