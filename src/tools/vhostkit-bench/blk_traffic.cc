#include "blk_traffic.h"

#include <poll.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <random>
#include <thread>

namespace vhostkit::bench {

void run_blk_queue(driver::BlkDriver& f, const BlkQueueConfig& cfg, const Control& ctl,
                   BlkCounters& out, Histogram& hist) noexcept {
  pin_to(cfg.cpu);
  if (cfg.blocks == 0) {  // a disk smaller than one request: nothing to do
    out.drained.store(true, std::memory_order_release);
    return;
  }
  const std::uint16_t q = cfg.q;
  const std::uint32_t type =
      cfg.rw == BlkRw::randread ? virtio::blk_type::in : virtio::blk_type::out;
  const std::uint64_t sectors_per_block = cfg.bs / virtio::kBlkSectorSize;
  std::mt19937_64 rng(cfg.seed);
  std::uniform_int_distribution<std::uint64_t> block(0, cfg.blocks - 1);
  // Submit times by slot; sized once, before the loop.
  std::vector<std::uint64_t> t_submit(f.depth(), 0);
  // Writes carry a pattern naming queue and slot (the content does not matter to the device).
  for (std::uint16_t s = 0; s < f.depth(); ++s) {
    std::memset(f.data(q, s), static_cast<int>((q * 31 + s) & 0xff), cfg.bs);
  }
  // Notifications stay off while we work; event mode arms them only before it sleeps.
  f.disable_calls(q);

  std::uint64_t completed = 0, errors = 0;
  for (;;) {
    const Phase ph = ctl.get();
    if (ph == Phase::done) break;
    std::size_t added = 0;
    if (ph < Phase::drain) {
      for (int slot; (slot = f.acquire(q)) >= 0;) {
        const auto s = static_cast<std::uint16_t>(slot);
        t_submit[s] = now_ns();
        if (!f.submit(q, s, type, block(rng) * sectors_per_block, cfg.bs)) {
          f.release(q, s);
          break;
        }
        ++added;
      }
      if (added != 0) f.publish(q);
    }
    const bool measuring = ph == Phase::measure;
    const std::size_t done = f.complete(q, [&](std::uint16_t slot, std::uint8_t status) noexcept {
      if (status != virtio::kBlkSOk) ++errors;
      if (measuring) hist.record(now_ns() - t_submit[slot]);
    });
    completed += done;
    out.completed.store(completed, std::memory_order_relaxed);
    out.errors.store(errors, std::memory_order_relaxed);
    out.inflight.store(f.inflight(q), std::memory_order_relaxed);
    if (ph == Phase::drain && f.inflight(q) == 0)
      out.drained.store(true, std::memory_order_release);
    if (done != 0 || added != 0) continue;
    if (cfg.busy) {
      cpu_relax();
    } else if (f.inflight(q) != 0) {
      // Nothing came back yet: sleep until the device calls, then turn calls off again.
      f.wait_call(q, std::chrono::milliseconds(10));
      f.disable_calls(q);
    } else {
      // Drained: nothing to wait for but the control thread.
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }
}

namespace {

bool sleep_unless_stopped(int sigfd, std::chrono::milliseconds d) {
  pollfd p{sigfd, POLLIN, 0};
  return ::poll(&p, 1, static_cast<int>(d.count())) <= 0;
}

struct Sums {
  std::uint64_t completed = 0, errors = 0, inflight = 0;
};

bool all_drained(const std::unique_ptr<BlkCounters[]>& c, std::uint16_t n) {
  for (std::uint16_t i = 0; i < n; ++i) {
    if (!c[i].drained.load(std::memory_order_acquire)) return false;
  }
  return true;
}

Sums sum(const std::unique_ptr<BlkCounters[]>& c, std::uint16_t n) {
  Sums s;
  for (std::uint16_t i = 0; i < n; ++i) {
    s.completed += c[i].completed.load(std::memory_order_relaxed);
    s.errors += c[i].errors.load(std::memory_order_relaxed);
    s.inflight += c[i].inflight.load(std::memory_order_relaxed);
  }
  return s;
}

}  // namespace

BlkResult run_blk(driver::BlkDriver& f, const BlkRunConfig& cfg, int sigfd, bool& stopped) {
  const std::uint16_t queues = f.num_queues();
  const std::uint64_t blocks = f.info().capacity * virtio::kBlkSectorSize / cfg.bs;
  Control ctl;
  auto counters = std::make_unique<BlkCounters[]>(queues);
  std::vector<std::unique_ptr<Histogram>> hists;
  std::vector<std::thread> threads;
  for (std::uint16_t q = 0; q < queues; ++q) hists.push_back(std::make_unique<Histogram>());
  for (std::uint16_t q = 0; q < queues; ++q) {
    const BlkQueueConfig qc{.q = q,
                            .rw = cfg.rw,
                            .bs = cfg.bs,
                            .blocks = blocks,
                            .busy = cfg.busy,
                            .cpu = cfg.cpus.empty() ? -1 : cfg.cpus[q % cfg.cpus.size()],
                            .seed = 0x9e3779b97f4a7c15ull * (q + 1)};
    threads.emplace_back([&f, qc, &ctl, &counters, &hists, q] {
      run_blk_queue(f, qc, ctl, counters[q], *hists[q]);
    });
  }
  const auto ms = [](double s) { return std::chrono::milliseconds(static_cast<long>(s * 1000)); };
  if (cfg.warmup > 0 && !sleep_unless_stopped(sigfd, ms(cfg.warmup))) stopped = true;

  ctl.set(Phase::measure);
  const auto t0 = std::chrono::steady_clock::now();
  const Sums start = sum(counters, queues);
  Sums prev = start;
  auto tick = t0;
  double elapsed = 0;
  while (!stopped && elapsed < cfg.duration) {
    if (!sleep_unless_stopped(sigfd, ms(std::min(1.0, cfg.duration - elapsed)))) stopped = true;
    const auto now = std::chrono::steady_clock::now();
    const Sums cur = sum(counters, queues);
    const double dt = std::chrono::duration<double>(now - tick).count();
    elapsed = std::chrono::duration<double>(now - t0).count();
    if (cfg.live && dt > 0) {
      std::fprintf(
          stderr, "%s\n",
          format_blk_live(elapsed, static_cast<double>(cur.completed - prev.completed) / dt, cfg.bs,
                          cur.errors)
              .c_str());
    }
    prev = cur;
    tick = now;
  }
  const Sums end = sum(counters, queues);
  const double window = seconds_since(t0);

  // Drain: no new requests; wait until every thread has seen the drain and has every request
  // it submitted back (at most 2 s).
  ctl.set(Phase::drain);
  const auto d0 = std::chrono::steady_clock::now();
  while (seconds_since(d0) < 2.0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    if (all_drained(counters, queues)) break;
  }
  ctl.set(Phase::done);
  for (auto& t : threads) t.join();
  const Sums fin = sum(counters, queues);

  BlkResult r;
  r.label = cfg.label;
  r.rw = cfg.rw;
  r.bs = cfg.bs;
  r.iodepth = f.depth();
  r.queues = queues;
  r.poll = cfg.busy ? "busy" : "event";
  r.seconds = window;
  r.requests = end.completed - start.completed;
  r.total = fin.completed;
  // A request still in flight after the drain never completed: an error too.
  r.errors = fin.errors + fin.inflight;
  if (window > 0) r.iops = static_cast<double>(r.requests) / window;
  set_latency(r, hists);
  return r;
}

}  // namespace vhostkit::bench
