// host_probe: what this host can do at all, measured in the same run as the benchmarks so their
// figures can be read against it. Two threads pinned to two CPUs:
//   * cache-line ping-pong: one atomic bounced between the cores (round trip, ns) - the floor
//     under any ring index handoff;
//   * eventfd ping-pong: blocking read/write on two eventfds (round trip, us) - the price of a
//     kick or call that wakes a sleeping thread;
//   * a bare SPSC ring in shared memory moving 64 B and 1518 B packets in batches of 32, copied
//     in by the producer and out by the consumer (Mpps) - an upper bound for any copying
//     vhost data path on this host.
// Prints a table and, with --csv FILE, appends "utc,test,size,value,unit" rows. --test picks
// tests and --bare prints values only: bench/backends.sh takes a 0.1 s cache-line round trip
// before and after every run, which tells where the hypervisor has put the two vCPUs (on this
// host 110, 450 or 900 ns, and the data paths' Mpps move inversely with it).
#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include <pthread.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace {

using Clock = std::chrono::steady_clock;

inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#endif
}

void pin(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

double secs(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// Round trips of one cache line: the initiator writes an odd value and waits for the even reply.
double cacheline_rtt_ns(int cpu_a, int cpu_b, double seconds) {
  alignas(64) std::atomic<std::uint64_t> line{0};
  std::atomic<bool> stop{false};
  std::thread echo([&] {
    pin(cpu_b);
    std::uint64_t seen = 0;
    while (!stop.load(std::memory_order_relaxed)) {
      const std::uint64_t v = line.load(std::memory_order_acquire);
      if ((v & 1u) != 0 && v != seen) {
        seen = v;
        line.store(v + 1, std::memory_order_release);  // release: the reply follows the read
      } else {
        cpu_relax();
      }
    }
  });
  pin(cpu_a);
  std::uint64_t rounds = 0, v = 0;
  const auto t0 = Clock::now();
  auto t = t0;
  while (secs(t0, t) < seconds) {
    for (int i = 0; i < 1024; ++i) {
      line.store(++v, std::memory_order_release);  // odd: a request
      while (line.load(std::memory_order_acquire) != v + 1) cpu_relax();
      ++v;
      ++rounds;
    }
    t = Clock::now();
  }
  stop = true;
  echo.join();
  return secs(t0, t) * 1e9 / static_cast<double>(rounds);
}

double eventfd_rtt_us(int cpu_a, int cpu_b, double seconds) {
  const int ping = ::eventfd(0, EFD_CLOEXEC), pong = ::eventfd(0, EFD_CLOEXEC);
  if (ping < 0 || pong < 0) return -1;
  std::atomic<bool> stop{false};
  std::thread echo([&] {
    pin(cpu_b);
    std::uint64_t v = 0;
    while (::read(ping, &v, sizeof v) == sizeof v) {
      const bool last = stop.load(std::memory_order_relaxed);
      const std::uint64_t one = 1;
      if (::write(pong, &one, sizeof one) != sizeof one || last) break;
    }
  });
  pin(cpu_a);
  std::uint64_t rounds = 0, v = 0;
  const std::uint64_t one = 1;
  const auto t0 = Clock::now();
  auto t = t0;
  bool ok = true;
  while (ok && secs(t0, t) < seconds) {
    for (int i = 0; i < 64 && ok; ++i) {
      ok = ::write(ping, &one, sizeof one) == sizeof one && ::read(pong, &v, sizeof v) == sizeof v;
      ++rounds;
    }
    t = Clock::now();
  }
  stop = true;
  [[maybe_unused]] auto w = ::write(ping, &one, sizeof one);  // let the echo see `stop`
  echo.join();
  ::close(ping);
  ::close(pong);
  return ok ? secs(t0, t) * 1e6 / static_cast<double>(rounds) : -1;
}

// A single-producer single-consumer ring of fixed 2 KiB slots; indices on their own lines.
struct Ring {
  static constexpr std::uint32_t kSlots = 1024, kSlotSize = 2048;
  alignas(64) std::atomic<std::uint32_t> head{0};  // consumer position
  alignas(64) std::atomic<std::uint32_t> tail{0};  // producer position
  alignas(64) std::uint32_t len[kSlots]{};
  alignas(64) std::uint8_t data[kSlots][kSlotSize];
};

double spsc_mpps(int cpu_a, int cpu_b, std::uint32_t size, double seconds) {
  constexpr std::uint32_t kBatch = 32;
  auto ring = std::make_unique<Ring>();
  std::atomic<bool> stop{false};
  std::uint64_t consumed = 0;
  std::thread consumer([&] {
    pin(cpu_b);
    std::vector<std::uint8_t> out(Ring::kSlotSize);
    std::uint32_t head = 0;
    std::uint64_t sink = 0;
    for (;;) {
      // acquire: the slots' bytes written before tail are visible after it
      const std::uint32_t tail = ring->tail.load(std::memory_order_acquire);
      if (tail == head) {
        if (stop.load(std::memory_order_relaxed)) break;
        cpu_relax();
        continue;
      }
      const std::uint32_t n = std::min(tail - head, kBatch);
      for (std::uint32_t i = 0; i < n; ++i) {
        const std::uint32_t s = (head + i) % Ring::kSlots;
        std::memcpy(out.data(), ring->data[s], ring->len[s]);
        sink += out[0];
      }
      head += n;
      // release: our reads of the slots finish before the producer may reuse them
      ring->head.store(head, std::memory_order_release);
      consumed += n;
    }
    if (sink == 42) std::fputc(' ', stderr);  // keeps the copies observable
  });
  pin(cpu_a);
  std::vector<std::uint8_t> pkt(size, 0xab);
  std::uint32_t tail = 0;
  const auto t0 = Clock::now();
  auto t = t0;
  std::uint64_t produced_at_end = 0;
  while (secs(t0, t) < seconds) {
    for (int k = 0; k < 256; ++k) {
      // acquire: the consumer is done with the slots it released
      const std::uint32_t head = ring->head.load(std::memory_order_acquire);
      const std::uint32_t room = Ring::kSlots - (tail - head);
      if (room < kBatch) {
        cpu_relax();
        continue;
      }
      for (std::uint32_t i = 0; i < kBatch; ++i) {
        const std::uint32_t s = (tail + i) % Ring::kSlots;
        pkt[0] = static_cast<std::uint8_t>(tail + i);
        std::memcpy(ring->data[s], pkt.data(), size);
        ring->len[s] = size;
      }
      tail += kBatch;
      // release: the slots' bytes and lengths are visible before the new tail
      ring->tail.store(tail, std::memory_order_release);
    }
    t = Clock::now();
  }
  produced_at_end = tail;
  stop = true;
  consumer.join();
  // What was produced in the window was consumed (the consumer drains before it stops).
  return static_cast<double>(std::min<std::uint64_t>(produced_at_end, consumed)) / secs(t0, t) /
         1e6;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"host_probe: cache-line and eventfd round trips, bare SPSC ring throughput"};
  int cpu_a = 0, cpu_b = 1;
  double seconds = 1.0;
  std::string csv;
  std::vector<std::string> only;
  bool bare = false;
  app.add_option("--cpu-a", cpu_a, "first CPU (initiator / producer)")->check(CLI::Range(0, 1023));
  app.add_option("--cpu-b", cpu_b, "second CPU (echo / consumer)")->check(CLI::Range(0, 1023));
  app.add_option("--seconds", seconds, "per test")->check(CLI::Range(0.05, 60.0));
  app.add_option("--csv", csv, "append utc,test,size,value,unit rows here");
  app.add_option("--test", only,
                 "run only this test (repeatable): cacheline_rtt, eventfd_rtt, spsc_ring_copy")
      ->check(CLI::IsMember({"cacheline_rtt", "eventfd_rtt", "spsc_ring_copy"}));
  app.add_flag("--bare", bare, "print each value alone on a line, no table (for scripts)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);
    std::fprintf(stderr, "host_probe: %s\n", e.what());
    return 2;
  }
  struct Row {
    std::string test;
    std::uint32_t size;
    double value;
    std::string unit;
  };
  std::vector<Row> rows;
  auto wanted = [&](const char* test) {
    return only.empty() || std::find(only.begin(), only.end(), test) != only.end();
  };
  if (wanted("cacheline_rtt"))
    rows.push_back({"cacheline_rtt", 64, cacheline_rtt_ns(cpu_a, cpu_b, seconds), "ns"});
  if (wanted("eventfd_rtt"))
    rows.push_back({"eventfd_rtt", 8, eventfd_rtt_us(cpu_a, cpu_b, seconds), "us"});
  if (wanted("spsc_ring_copy")) {
    rows.push_back({"spsc_ring_copy", 64, spsc_mpps(cpu_a, cpu_b, 64, seconds), "Mpps"});
    rows.push_back({"spsc_ring_copy", 1518, spsc_mpps(cpu_a, cpu_b, 1518, seconds), "Mpps"});
  }

  if (bare) {
    for (const Row& r : rows) std::printf("%.1f\n", r.value);
  } else {
    std::printf("%-16s %6s %10s %s\n", "test", "size", "value", "unit");
    for (const Row& r : rows)
      std::printf("%-16s %6u %10.3f %s\n", r.test.c_str(), r.size, r.value, r.unit.c_str());
  }
  if (!csv.empty()) {
    const bool fresh = !std::ifstream(csv).good() || std::ifstream(csv).peek() == EOF;
    std::ofstream f(csv, std::ios::app);
    if (!f) {
      std::fprintf(stderr, "host_probe: cannot write %s\n", csv.c_str());
      return 1;
    }
    char utc[32];
    const std::time_t now = std::time(nullptr);
    std::tm tm{};
    gmtime_r(&now, &tm);
    std::strftime(utc, sizeof utc, "%Y-%m-%dT%H:%M:%SZ", &tm);
    if (fresh) f << "utc,test,size,value,unit\n";
    for (const Row& r : rows)
      f << fmt::format("{},{},{},{:.3f},{}\n", utc, r.test, r.size, r.value, r.unit);
  }
  return 0;
}
