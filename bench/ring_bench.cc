// Ring costs, each for the split and the packed layout (<Split>, <Packed>):
//   DevicePopPush     device pop + push per chain, one thread (the avail side is replayed: split
//                     moves avail->idx on by a ring; packed copies back a saved ring, 16 bytes
//                     a chain, since its used writes overwrite the descriptors)
//   DriverAddReclaim  driver add + reclaim per chain, one thread (used entries echoed back)
//   RingTransfer/N    two pinned threads: the driver (core 0) copies N-byte packets into out
//                     buffers and adds them in batches of 32; the device (core 1) pops, copies
//                     each payload out, pushes used; the driver reclaims. Busy polling.
//   DeviceFill/bytes:N/log:L  the device fills N bytes into each of a ring of writable buffers,
//                     with (L=1) or without (L=0) a dirty log attached: what LOG_ALL costs.
// items_per_second is chains (packets) per second.
#include <benchmark/benchmark.h>
#include <pthread.h>
#include <sched.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "vhostkit/memory/guest_memory.h"
#include "vhostkit/virtio/features.h"
#include "vhostkit/virtq/packed_queue.h"
#include "vhostkit/virtq/split_queue.h"

namespace {

using namespace vhostkit;
using Buf = virtq::DriverQueue::Buffer;

constexpr std::uint16_t kSize = 256;
constexpr std::size_t kBatch = 32;
constexpr std::uint64_t kGpa = 0x40000000;
constexpr std::size_t kBufStride = 2048;
constexpr std::size_t kRingArea = 64 * 1024;
constexpr std::size_t kMemBytes = kRingArea + kSize * kBufStride;

void pin(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  (void)pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

struct FreeDeleter {
  void operator()(void* p) const noexcept { std::free(p); }
};

struct Split {
  using Driver = virtq::DriverQueue;
  using Device = virtq::DeviceQueue;
  static std::size_t ring_bytes() { return virtq::DriverRingLayout::for_size(kSize).total_bytes; }
  static void attach(Device& dev, const memory::GuestMemory& mem, const Driver& drv,
                     std::uint64_t features) {
    dev.attach(&mem, virtq::SplitRing{drv.desc(), drv.avail(), drv.used(), kSize}, features, 0);
  }
};
struct Packed {
  using Driver = virtq::PackedDriverQueue;
  using Device = virtq::PackedDeviceQueue;
  static std::size_t ring_bytes() { return virtq::PackedRingLayout::for_size(kSize).total_bytes; }
  static void attach(Device& dev, const memory::GuestMemory& mem, const Driver& drv,
                     std::uint64_t features) {
    dev.attach(&mem, virtq::PackedRing{drv.desc(), drv.driver_event(), drv.device_event(), kSize},
               features);
  }
};

// One guest region holding the ring and kSize packet buffers; a driver and a device on it.
template <class L>
struct Setup {
  explicit Setup(std::uint64_t features = 0)
      : block(static_cast<std::byte*>(std::aligned_alloc(4096, kMemBytes))) {
    std::memset(block.get(), 0, kMemBytes);
    (void)mem.add_local_region(memory::RegionSpec{kGpa, kMemBytes, 0x7f0000000000ull, 0},
                               block.get());
    (void)driver.init(std::span<std::byte>(block.get(), L::ring_bytes()), kGpa, kSize, features);
    L::attach(device, mem, driver, features);
  }
  std::uint64_t buf_gpa(std::size_t i) const { return kGpa + kRingArea + (i % kSize) * kBufStride; }
  std::byte* buf_host(std::size_t i) { return block.get() + kRingArea + (i % kSize) * kBufStride; }

  std::unique_ptr<std::byte, FreeDeleter> block;
  memory::GuestMemory mem;
  // Each on its own cache lines (two, for the adjacent-line prefetcher): the two threads of
  // RingTransfer write them, and sharing a line measured the false sharing, not the ring.
  alignas(128) typename L::Driver driver;
  alignas(128) typename L::Device device;
};

// Makes the kSize chains the driver added available again, a full ring later.
void replay(Setup<Split>& s, std::array<std::array<virtio::PackedDesc, kSize>, 2>&) {
  // The same kSize heads sit in the avail ring; move idx on by a full ring.
  s.driver.avail()->idx = static_cast<std::uint16_t>(s.driver.avail()->idx + kSize);
}
void replay(Setup<Packed>& s, std::array<std::array<virtio::PackedDesc, kSize>, 2>& saved) {
  // The device's next lap runs with the wrap counter flipped: the ring as the driver would
  // write it for that lap.
  const bool wrap = s.device.base().avail_wrap;
  std::memcpy(s.driver.desc(), saved[wrap ? 1 : 0].data(), sizeof saved[0]);
}

template <class L>
void DevicePopPush(benchmark::State& state) {
  Setup<L> s;
  for (std::size_t i = 0; i < kSize; ++i) {
    const Buf b{s.buf_gpa(i), 64};
    (void)s.driver.add(std::span(&b, 1), {}, i);
  }
  s.driver.publish();
  // The packed ring as added, for either wrap counter (unused by the split ring).
  std::array<std::array<virtio::PackedDesc, kSize>, 2> saved{};
  if constexpr (std::is_same_v<L, Packed>) {
    std::memcpy(saved[1].data(), s.driver.desc(), sizeof saved[1]);
    saved[0] = saved[1];
    for (auto& d : saved[0]) {
      d.flags = static_cast<std::uint16_t>((d.flags & ~virtio::kDescFAvail) | virtio::kDescFUsed);
    }
  }
  std::array<iovec, 8> segs{};
  std::uint64_t chains = 0;
  for (auto _ : state) {
    if (s.device.pending() == 0) replay(s, saved);
    for (std::size_t k = 0; k < kBatch && s.device.pending() != 0; ++k) {
      auto c = s.device.pop(segs);
      benchmark::DoNotOptimize(c);
      s.device.push_used(c->head, 0);
      ++chains;
    }
    s.device.publish_used();
    benchmark::DoNotOptimize(s.device.needs_notify());
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(chains));
}
BENCHMARK_TEMPLATE(DevicePopPush, Split);
BENCHMARK_TEMPLATE(DevicePopPush, Packed);

// The receive side of a device with and without live migration's dirty log: kSize writable
// buffers made available once (and again, a ring later); the device pops each, copies N bytes
// into it, marks them (log_write: a load and a branch with no log, atomic ORs on the bitmap with
// one) and pushes it used. Arg 0: bytes per chain; arg 1: 1 with a log attached (LOG_ALL on).
void DeviceFill(benchmark::State& state) {
  const auto len = static_cast<std::size_t>(state.range(0));
  const bool logging = state.range(1) != 0;
  Setup<Split> s;
  for (std::size_t i = 0; i < kSize; ++i) {
    const Buf b{s.buf_gpa(i), kBufStride};
    (void)s.driver.add({}, std::span(&b, 1), i);
  }
  s.driver.publish();
  std::vector<std::uint8_t> bitmap(kMemBytes / memory::DirtyLog::kPageSize / 8 + 64);
  memory::DirtyLog log;
  if (logging) {
    (void)log.attach_local(bitmap);
    s.mem.set_dirty_log(&log);
  }
  std::array<std::array<virtio::PackedDesc, kSize>, 2> unused{};
  alignas(64) std::array<std::byte, kBufStride> payload{};
  payload.fill(std::byte{0x5a});
  std::array<iovec, 8> segs{};
  std::uint64_t chains = 0;
  for (auto _ : state) {
    if (s.device.pending() == 0) replay(s, unused);
    for (std::size_t k = 0; k < kBatch && s.device.pending() != 0; ++k) {
      auto c = s.device.pop(segs);
      std::memcpy(c->writable[0].iov_base, payload.data(), len);
      s.device.log_write(c->writable, len);
      s.device.push_used(c->head, static_cast<std::uint32_t>(len));
      ++chains;
    }
    s.device.publish_used();
    benchmark::DoNotOptimize(s.device.needs_notify());
  }
  s.mem.set_dirty_log(nullptr);
  state.SetItemsProcessed(static_cast<std::int64_t>(chains));
}
BENCHMARK(DeviceFill)->ArgNames({"bytes", "log"})->ArgsProduct({{64, 1518}, {0, 1}});

// The "device" of DriverAddReclaim: answers the batch's chains (one descriptor each) in order
// without walking them.
void echo(Setup<Split>& s, const std::array<std::uint16_t, kBatch>& heads,
          virtq::detail::RingCursor&) {
  for (std::size_t k = 0; k < kBatch; ++k) s.device.push_used(heads[k], 0);
  s.device.publish_used();
}
void echo(Setup<Packed>& s, const std::array<std::uint16_t, kBatch>& ids,
          virtq::detail::RingCursor& cur) {
  // Used descriptors written in place, where the chains were made available; first flags last.
  const virtq::detail::RingCursor first = cur;
  virtio::PackedDesc* d = s.driver.desc();
  for (std::size_t k = 0; k < kBatch; ++k) {
    d[cur.pos].id = ids[k];
    d[cur.pos].len = 0;
    if (k != 0) d[cur.pos].flags = virtq::detail::used_bits(cur.wrap);
    cur.advance(1, kSize);
  }
  // Release: the batch's ids and later flags are visible before the first one reads as used.
  std::atomic_ref<std::uint16_t>(d[first.pos].flags)
      .store(virtq::detail::used_bits(first.wrap), std::memory_order_release);
}

template <class L>
void DriverAddReclaim(benchmark::State& state) {
  Setup<L> s;
  std::array<virtq::DriverQueue::Used, kBatch> used{};
  std::array<std::uint16_t, kBatch> heads{};
  virtq::detail::RingCursor echo_cursor;  // the packed echo's next used slot
  std::uint64_t chains = 0;
  for (auto _ : state) {
    for (std::size_t k = 0; k < kBatch; ++k) {
      const Buf b{s.buf_gpa(k), 64};
      heads[k] = *s.driver.add(std::span(&b, 1), {}, k);
    }
    s.driver.publish();
    benchmark::DoNotOptimize(s.driver.needs_kick());
    echo(s, heads, echo_cursor);
    chains += s.driver.get_used_burst(used);
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(chains));
}
BENCHMARK_TEMPLATE(DriverAddReclaim, Split);
BENCHMARK_TEMPLATE(DriverAddReclaim, Packed);

template <class L>
void RingTransfer(benchmark::State& state) {
  const auto pkt_len = static_cast<std::uint32_t>(state.range(0));
  Setup<L> s;
  std::atomic<bool> stop{false};
  std::thread device([&] {
    pin(1);
    std::array<iovec, 8> segs{};
    alignas(64) std::array<std::byte, 2048> local{};
    s.device.disable_notifications();  // busy polling: no kicks wanted
    while (!stop.load(std::memory_order_relaxed)) {
      std::size_t n = 0;
      while (n < kBatch && s.device.pending() != 0) {
        auto c = s.device.pop(segs);
        if (!c) continue;
        std::size_t off = 0;
        for (const iovec& v : c->readable) {
          std::memcpy(local.data() + off, v.iov_base, v.iov_len);
          off += v.iov_len;
        }
        benchmark::DoNotOptimize(local);
        s.device.push_used(c->head, 0);
        ++n;
      }
      if (n != 0) {
        s.device.publish_used();
        benchmark::DoNotOptimize(s.device.needs_notify());
      }
    }
  });
  pin(0);
  s.driver.disable_interrupts();
  alignas(64) std::array<std::byte, 2048> payload{};
  payload.fill(std::byte{0x5a});
  std::array<virtq::DriverQueue::Used, kBatch> used{};
  std::uint64_t next_buf = 0;
  std::uint64_t packets = 0;
  for (auto _ : state) {
    packets += s.driver.get_used_burst(used);
    std::size_t n = 0;
    while (n < kBatch && s.driver.free_count() != 0) {
      // Completions come back in order, so buffers are reused round-robin.
      std::memcpy(s.buf_host(next_buf), payload.data(), pkt_len);
      const Buf b{s.buf_gpa(next_buf), pkt_len};
      (void)s.driver.add(std::span(&b, 1), {}, next_buf);
      ++next_buf;
      ++n;
    }
    if (n != 0) {
      s.driver.publish();
      benchmark::DoNotOptimize(s.driver.needs_kick());
    }
  }
  stop = true;
  device.join();
  state.SetItemsProcessed(static_cast<std::int64_t>(packets));
  state.SetBytesProcessed(static_cast<std::int64_t>(packets * pkt_len));
}
BENCHMARK_TEMPLATE(RingTransfer, Split)->Arg(64)->Arg(1518)->UseRealTime();
BENCHMARK_TEMPLATE(RingTransfer, Packed)->Arg(64)->Arg(1518)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
