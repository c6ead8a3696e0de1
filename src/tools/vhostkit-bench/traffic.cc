#include "traffic.h"

#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace vhostkit::bench {

namespace vu = vhostkit::vhost_user;
using driver::NetDriver;

namespace {

constexpr std::uint8_t kDstMac[6] = {0x02, 0x00, 0x00, 0x00, 0x00, 0x02};
constexpr std::uint8_t kSrcMac[6] = {0x02, 0x00, 0x00, 0x00, 0x00, 0x01};
constexpr std::size_t kMagicOff = 14, kSeqOff = 18, kTimeOff = 26;

// Event mode, nothing to do: arm call notifications on the given rings, sleep in poll() until
// one fires (or timeout), consume the eventfd counts and disarm again, so the back-end does not
// pay a write() per batch while we are awake anyway.
void sleep_on_calls(vu::FrontendRing* a, vu::FrontendRing* b, int timeout_ms) noexcept {
  pollfd pfd[2];
  vu::FrontendRing* rings[2];
  int n = 0;
  bool ready = false;
  for (vu::FrontendRing* r : {a, b}) {
    if (r == nullptr || !r->call.valid()) continue;
    // enable_interrupts re-reads used->idx after arming: a completion that raced with arming
    // is seen here instead of slept through.
    if (r->enable_interrupts()) ready = true;
    pfd[n] = {r->call.get(), POLLIN, 0};
    rings[n++] = r;
  }
  if (n == 0) return;
  if (::poll(pfd, static_cast<nfds_t>(n), ready ? 0 : timeout_ms) > 0) {
    for (int i = 0; i < n; ++i) {
      if ((pfd[i].revents & POLLIN) == 0) continue;
      std::uint64_t v = 0;
      if (::read(pfd[i].fd, &v, sizeof v) == static_cast<ssize_t>(sizeof v)) ++rings[i]->calls;
    }
  }
  for (int i = 0; i < n; ++i) rings[i]->disable_interrupts();
}

std::uint64_t outstanding(const vu::FrontendRing& r) noexcept {
  return static_cast<std::uint64_t>(r.size() - r.free_count());
}

void run_throughput(NetDriver& s, const PairConfig& cfg, const Control& ctl,
                    PairCounters& out) noexcept {
  const std::uint16_t qp = cfg.qp;
  vu::FrontendRing& txr = s.session().ring(NetDriver::tx_index(qp));
  vu::FrontendRing& rxr = s.session().ring(NetDriver::rx_index(qp));
  const bool sends = cfg.mode != Mode::rxonly;
  const bool receives = cfg.mode != Mode::txonly;
  std::uint64_t tx = 0, rx = 0, seq = 0;
  auto fill = [&](std::size_t, std::span<std::uint8_t> room) noexcept {
    return write_frame(room, cfg.size, seq++, 0);
  };
  auto on_frame = [&](std::span<const std::uint8_t>) noexcept { ++rx; };
  for (;;) {
    const Phase ph = ctl.get();
    if (ph == Phase::done) break;
    std::size_t sent = 0, got = 0;
    if (sends && ph != Phase::drain) {
      sent = s.tx_burst_fill(qp, cfg.burst, fill);
      tx += sent;
    } else if (sends) {
      s.reclaim_tx(qp);
    }
    if (receives) got = s.rx_burst(qp, cfg.burst, on_frame);
    out.tx.store(tx, std::memory_order_relaxed);
    out.rx.store(rx, std::memory_order_relaxed);
    out.tx_outstanding.store(outstanding(txr), std::memory_order_relaxed);
    if (ph == Phase::drain) out.draining.store(true, std::memory_order_release);
    if (sent != 0 || got != 0) continue;
    if (cfg.busy) {
      cpu_relax();
    } else {
      // Wake for room on the transmitq (if we are sending) or frames on the receiveq.
      sleep_on_calls(receives ? &rxr : nullptr, sends && ph != Phase::drain ? &txr : nullptr, 10);
    }
  }
}

// fwd: one burst of cfg.burst frames (testpmd's --tx-first), then every frame the back-end
// sends back goes out again from the buffer it arrived in (NetDriver::forward). tx counts the
// frames put on the transmitq, the first burst included; rx the frames received.
void run_forward(NetDriver& s, const PairConfig& cfg, const Control& ctl,
                 PairCounters& out) noexcept {
  const std::uint16_t qp = cfg.qp;
  vu::FrontendRing& txr = s.session().ring(NetDriver::tx_index(qp));
  vu::FrontendRing& rxr = s.session().ring(NetDriver::rx_index(qp));
  const driver::RingStats& txs = s.stats(NetDriver::tx_index(qp));
  const driver::RingStats& rxs = s.stats(NetDriver::rx_index(qp));
  const std::uint64_t tx0 = txs.frames, rx0 = rxs.frames;
  std::uint64_t seq = 0;
  s.tx_burst_fill(qp, cfg.burst, [&](std::size_t, std::span<std::uint8_t> room) noexcept {
    return write_frame(room, cfg.size, seq++, 0);
  });
  auto count = [](std::span<const std::uint8_t>) noexcept {};
  for (;;) {
    const Phase ph = ctl.get();
    if (ph == Phase::done) break;
    std::size_t moved = 0;
    if (ph != Phase::drain) {
      moved = s.forward(qp, cfg.burst);
    } else {
      s.reclaim_tx(qp);
      moved = s.rx_burst(qp, cfg.burst, count);
    }
    out.tx.store(txs.frames - tx0, std::memory_order_relaxed);
    out.rx.store(rxs.frames - rx0, std::memory_order_relaxed);
    out.tx_outstanding.store(outstanding(txr), std::memory_order_relaxed);
    if (ph == Phase::drain) out.draining.store(true, std::memory_order_release);
    if (moved != 0) continue;
    if (cfg.busy) {
      cpu_relax();
    } else {
      sleep_on_calls(&rxr, nullptr, 10);
    }
  }
}

void run_latency(NetDriver& s, const PairConfig& cfg, const Control& ctl, PairCounters& out,
                 Histogram& hist) noexcept {
  const std::uint16_t qp = cfg.qp;
  vu::FrontendRing& rxr = s.session().ring(NetDriver::rx_index(qp));
  const std::uint64_t timeout_ns = static_cast<std::uint64_t>(cfg.reply_timeout.count()) * 1000000u;
  std::uint64_t tx = 0, rx = 0, late = 0, seq = 0;
  while (ctl.get() < Phase::drain) {
    const bool measuring = ctl.get() == Phase::measure;
    std::uint64_t t_sent = 0;
    const std::size_t n =
        s.tx_burst_fill(qp, 1, [&](std::size_t, std::span<std::uint8_t> room) noexcept {
          t_sent = now_ns();
          return write_frame(room, cfg.size, seq, t_sent);
        });
    if (n == 0) {
      s.reclaim_tx(qp);
      continue;
    }
    ++tx;
    bool back = false;
    std::uint64_t rtt = 0;
    auto on_frame = [&](std::span<const std::uint8_t> f) noexcept {
      std::uint64_t fseq = 0, ft = 0;
      ++rx;
      if (!read_frame(f, fseq, ft)) return;
      if (fseq == seq) {
        rtt = now_ns() - t_sent;
        back = true;
      } else {
        ++late;
      }
    };
    while (!back) {
      if (s.rx_burst(qp, cfg.burst, on_frame) != 0) continue;
      if (now_ns() - t_sent > timeout_ns || ctl.get() == Phase::done) break;
      if (cfg.busy) {
        cpu_relax();
      } else {
        sleep_on_calls(&rxr, nullptr, 10);
      }
    }
    ++seq;
    if (back && measuring) hist.record(rtt);
    out.tx.store(tx, std::memory_order_relaxed);
    out.rx.store(rx, std::memory_order_relaxed);
    out.late.store(late, std::memory_order_relaxed);
  }
  // Drain: a reply that timed out may still arrive.
  out.draining.store(true, std::memory_order_release);
  auto count = [&](std::span<const std::uint8_t>) noexcept { ++rx; };
  while (ctl.get() != Phase::done) {
    if (s.rx_burst(qp, cfg.burst, count) == 0) {
      if (cfg.busy) {
        cpu_relax();
      } else {
        sleep_on_calls(&rxr, nullptr, 10);
      }
    }
    out.rx.store(rx, std::memory_order_relaxed);
  }
  s.reclaim_tx(qp);
  out.tx_outstanding.store(outstanding(s.session().ring(NetDriver::tx_index(qp))),
                           std::memory_order_relaxed);
}

}  // namespace

void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

void pin_to(int cpu) noexcept {
  if (cpu < 0) return;
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  ::pthread_setaffinity_np(::pthread_self(), sizeof set, &set);
}

std::uint64_t now_ns() noexcept {
  // CLOCK_MONOTONIC through the vDSO: no system call.
  timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1000000000u +
         static_cast<std::uint64_t>(ts.tv_nsec);
}

std::size_t write_frame(std::span<std::uint8_t> room, std::size_t len, std::uint64_t seq,
                        std::uint64_t t_ns) noexcept {
  if (len < kMinFrame) len = kMinFrame;
  if (len > room.size()) return room.size() + 1;  // the session counts it oversize
  // Only the header and our fields are written: the payload beyond is whatever the buffer held
  // (zeroes at first), as testpmd's txonly does; a benchmark need not pay a memset per frame.
  std::uint8_t* p = room.data();
  std::memcpy(p, kDstMac, 6);
  std::memcpy(p + 6, kSrcMac, 6);
  p[12] = 0x88;
  p[13] = 0xb5;
  std::memcpy(p + kMagicOff, &kMagic, 4);
  std::memcpy(p + kSeqOff, &seq, 8);
  std::memcpy(p + kTimeOff, &t_ns, 8);
  return len;
}

bool read_frame(std::span<const std::uint8_t> f, std::uint64_t& seq, std::uint64_t& t_ns) noexcept {
  if (f.size() < kTimeOff + 8) return false;
  std::uint32_t magic = 0;
  std::memcpy(&magic, f.data() + kMagicOff, 4);
  if (magic != kMagic) return false;
  std::memcpy(&seq, f.data() + kSeqOff, 8);
  std::memcpy(&t_ns, f.data() + kTimeOff, 8);
  return true;
}

void run_pair(NetDriver& s, const PairConfig& cfg, const Control& ctl, PairCounters& out,
              Histogram& hist) noexcept {
  pin_to(cfg.cpu);
  if (!cfg.busy) {
    // Notifications stay off while we work; sleep_on_calls arms them before each sleep.
    s.session().ring(NetDriver::tx_index(cfg.qp)).disable_interrupts();
    s.session().ring(NetDriver::rx_index(cfg.qp)).disable_interrupts();
  }
  if (cfg.mode == Mode::latency) {
    run_latency(s, cfg, ctl, out, hist);
  } else if (cfg.mode == Mode::fwd) {
    run_forward(s, cfg, ctl, out);
  } else {
    run_throughput(s, cfg, ctl, out);
  }
}

}  // namespace vhostkit::bench
