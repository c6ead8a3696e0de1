// Driver and device sharing one memory move tens of thousands of random chains; every byte is
// checked both ways. Single-threaded (interleaved, with notification bookkeeping that catches a
// lost wake-up) and two-threaded (busy polling, exercising the memory ordering). Both layouts,
// split and packed (an odd ring size too), with and without event suppression and IN_ORDER.
#include <atomic>
#include <chrono>
#include <random>
#include <thread>
#include <vector>

#include "testing/virtq_ring.h"

namespace vhostkit::virtq {
namespace {

using testing::kEventIdx;
using testing::kIndirect;
using testing::kInOrder;
using testing::PackedRig;
using testing::Rig;
using Buf = DriverQueue::Buffer;

constexpr std::uint64_t kSlotBytes = 32 * 1024;
// Slots sit on both sides of the A|B boundary; slot 15 starts 1 KiB before it, so most chains
// placed there cross into the next region.
constexpr std::uint64_t kAreaGpa = Rig::kGpaB - 15 * kSlotBytes - 1024;

// What the device writes at byte i of the writable part, given the readable bytes.
inline std::uint8_t response_byte(const std::vector<std::uint8_t>& readable, std::size_t i) {
  const std::uint8_t base = readable.empty() ? 0x77 : readable[i % readable.size()];
  return static_cast<std::uint8_t>(base ^ static_cast<std::uint8_t>(i * 31 + 7));
}

// The device's work for one chain: gather the readable bytes, check them against what the
// driver wrote, fill the first `reply` bytes of the writable part. Returns the used len.
std::uint32_t serve(const Chain& c, const std::vector<std::uint8_t>& expected_out,
                    std::uint64_t reply) {
  std::vector<std::uint8_t> readable;
  readable.reserve(c.readable_len);
  for (const iovec& v : c.readable) {
    const auto* p = static_cast<const std::uint8_t*>(v.iov_base);
    readable.insert(readable.end(), p, p + v.iov_len);
  }
  EXPECT_EQ(readable.size(), c.readable_len);
  EXPECT_EQ(readable, expected_out) << "head " << c.head;
  EXPECT_LE(reply, c.writable_len);
  std::size_t i = 0;
  for (const iovec& v : c.writable) {
    auto* p = static_cast<std::uint8_t*>(v.iov_base);
    for (std::size_t k = 0; k < v.iov_len && i < reply; ++k) p[k] = response_byte(readable, i++);
  }
  return static_cast<std::uint32_t>(i);
}

// Driver-side traffic: random chains placed in per-slot areas, with a record of each.
template <class R>
class Traffic {
 public:
  struct Record {
    std::vector<Buf> out, in;
    std::vector<std::uint8_t> out_bytes;
    std::uint64_t in_len = 0;
    std::uint64_t reply_len = 0;  // what the device writes: mostly all, sometimes a prefix
  };

  Traffic(R& rig, std::uint16_t size, std::uint32_t seed)
      : rig_(rig), size_(size), rng_(seed), records_(size), by_head_(size) {
    for (std::uint16_t s = 0; s < size; ++s) free_slots_.push_back(s);
  }

  // Adds one random chain; false when out of slots or descriptors.
  bool add_one() {
    if (free_slots_.empty() || added == limit) return false;
    // A random free slot, so every slot (the one across the region boundary too) gets used.
    std::swap(free_slots_[pick(0, free_slots_.size() - 1)], free_slots_.back());
    const std::uint16_t slot = free_slots_.back();
    Record& r = records_[slot];
    r = Record{};
    const std::size_t nout = pick(0, 4);
    const std::size_t nin = pick(nout == 0 ? 1 : 0, 4);
    std::uint64_t gpa = kAreaGpa + slot * kSlotBytes + pick(0, 1024);
    auto make = [&](std::vector<Buf>& v, std::size_t n) {
      for (std::size_t i = 0; i < n; ++i) {
        // Mostly short, some empty, a few long.
        const std::size_t kind = pick(0, 9);
        const auto len = static_cast<std::uint32_t>(kind == 0   ? 0
                                                    : kind == 9 ? pick(1, 3000)
                                                                : pick(1, 200));
        v.push_back({gpa, len});
        gpa += len + pick(0, 64);
      }
    };
    make(r.out, nout);
    make(r.in, nin);
    for (const Buf& b : r.out) {
      const std::uint64_t seed = rng_();
      for (std::uint32_t k = 0; k < b.len; ++k) {
        r.out_bytes.push_back(static_cast<std::uint8_t>((seed >> (k % 29)) + k * 13));
      }
      if (b.len != 0) {
        std::memcpy(rig_.host(b.gpa), r.out_bytes.data() + r.out_bytes.size() - b.len, b.len);
      }
    }
    for (const Buf& b : r.in) {
      std::memset(rig_.host(b.gpa), 0xee, b.len);
      r.in_len += b.len;
    }
    r.reply_len = pick(0, 3) == 0 ? pick(0, r.in_len) : r.in_len;
    auto head = rig_.driver.add(r.out, r.in, slot);
    if (!head) {
      EXPECT_EQ(head.error(), Errc::would_block);
      return false;
    }
    free_slots_.pop_back();
    by_head_[*head] = &r;
    ++added;
    return true;
  }

  // Checks a reclaimed chain and frees its slot.
  void check_used(const DriverQueue::Used& u) {
    ASSERT_LT(u.token, size_);
    Record& r = records_[u.token];
    ASSERT_EQ(u.len, r.reply_len) << "token " << u.token;
    std::vector<std::uint8_t> got, want(r.in_len, 0xee);
    for (const Buf& b : r.in) got.insert(got.end(), rig_.host(b.gpa), rig_.host(b.gpa) + b.len);
    for (std::size_t i = 0; i < r.reply_len; ++i) want[i] = response_byte(r.out_bytes, i);
    ASSERT_TRUE(got == want) << "token " << u.token;
    by_head_[u.head] = nullptr;
    free_slots_.push_back(static_cast<std::uint16_t>(u.token));
    ++completed;
  }

  // The device's view of what the driver put in a chain (set before publish, read after).
  const std::vector<std::uint8_t>& expected_out(std::uint16_t head) const {
    return by_head_[head]->out_bytes;
  }
  std::uint64_t reply_len(std::uint16_t head) const { return by_head_[head]->reply_len; }

  std::size_t pick(std::size_t lo, std::size_t hi) {
    return std::uniform_int_distribution<std::size_t>(lo, hi)(rng_);
  }

  std::uint64_t completed = 0;
  std::uint64_t added = 0;
  std::uint64_t limit = ~std::uint64_t{0};  // chains to add in all

 private:
  R& rig_;
  std::uint16_t size_;
  std::mt19937 rng_;
  std::vector<Record> records_;
  std::vector<std::uint16_t> free_slots_;
  std::vector<Record*> by_head_;
};

struct Mode {
  std::uint64_t features;
  std::uint16_t size;
  const char* name;
};

template <class R>
void interleaved(const Mode& mode) {
  // 70,000 chains: both 16-bit indices (split) and the wrap counters (packed) wrap many times.
  constexpr std::uint64_t kChains = 70000;
  const std::uint16_t kSize = mode.size;
  R rig(kSize, mode.features);
  Traffic<R> t(rig, kSize, 1234);
  t.limit = kChains;
  std::array<iovec, 64> segs{};
  std::vector<DriverQueue::Used> used(kSize);
  bool device_asleep = false, driver_asleep = false;
  std::uint64_t spanning = 0, kicks = 0, calls = 0;
  rig.driver.disable_interrupts();

  while (t.completed < kChains) {
    // Driver: add a random batch, publish, kick if asked.
    const std::size_t batch = t.pick(1, kSize);
    std::size_t added = 0;
    while (added < batch && t.add_one()) ++added;
    if (added != 0) {
      rig.driver.publish();
      const bool kick = rig.driver.needs_kick();
      // A device that went to sleep with notifications enabled must be kicked.
      if (device_asleep) {
        ASSERT_TRUE(kick) << "lost kick after " << t.completed;
      }
      if (kick) {
        ++kicks;
        device_asleep = false;
        rig.device.disable_notifications();
      }
    }
    // Device (when awake): serve a random number of chains, publish once, call if asked.
    if (!device_asleep) {
      std::size_t budget = t.pick(1, kSize);
      std::size_t served = 0;
      while (served < budget && rig.device.pending() != 0) {
        auto c = rig.device.pop(segs);
        ASSERT_TRUE(c.has_value()) << to_string(c.error());
        for (const iovec& v : c->readable) spanning += v.iov_base == rig.host(Rig::kGpaB);
        for (const iovec& v : c->writable) spanning += v.iov_base == rig.host(Rig::kGpaB);
        rig.device.push_used(c->head, serve(*c, t.expected_out(c->head), t.reply_len(c->head)));
        ++served;
      }
      if (served != 0) {
        rig.device.publish_used();
        const bool call = rig.device.needs_notify();
        if (driver_asleep) {
          ASSERT_TRUE(call) << "lost call after " << t.completed;
        }
        if (call) {
          ++calls;
          driver_asleep = false;
          rig.driver.disable_interrupts();
        }
      }
      if (rig.device.pending() == 0 && t.pick(0, 3) == 0) {
        device_asleep = !rig.device.enable_notifications();
        if (!device_asleep) rig.device.disable_notifications();
      }
    }
    // Driver (when awake): reclaim a random burst and check every byte.
    if (!driver_asleep) {
      const std::size_t want = t.pick(1, used.size());
      const std::size_t n = rig.driver.get_used_burst(std::span(used).first(want));
      for (std::size_t i = 0; i < n; ++i) t.check_used(used[i]);
      if (::testing::Test::HasFatalFailure()) return;
      if (n < want && t.pick(0, 1) == 0) {
        driver_asleep = !rig.driver.enable_interrupts();
        if (!driver_asleep) rig.driver.disable_interrupts();
      }
    }
  }
  EXPECT_GT(spanning, 0u) << "no chain crossed the region boundary";
  EXPECT_GT(kicks, 0u);
  EXPECT_GT(calls, 0u);
  for (std::size_t e = 0; e < kChainErrorCount; ++e) EXPECT_EQ(rig.device.errors()[e], 0u);
  EXPECT_EQ(rig.driver.bad_used(), 0u);
  EXPECT_EQ(rig.driver.free_count(), kSize);
}

template <class R>
void two_threads(const Mode& mode) {
  constexpr std::uint64_t kChains = 20000;
  const std::uint16_t kSize = mode.size;
  R rig(kSize, mode.features);
  Traffic<R> t(rig, kSize, 99);
  t.limit = kChains;
  std::atomic<bool> stop{false};
  std::atomic<std::uint64_t> served{0};

  std::thread device([&] {
    std::array<iovec, 64> segs{};
    std::uint64_t n = 0;
    while (!stop.load(std::memory_order_relaxed)) {
      std::size_t batch = 0;
      while (rig.device.pending() != 0 && batch < kSize) {
        auto c = rig.device.pop(segs);
        if (!c) {
          ADD_FAILURE() << to_string(c.error());
          stop = true;
          break;
        }
        rig.device.push_used(c->head, serve(*c, t.expected_out(c->head), t.reply_len(c->head)));
        ++batch;
      }
      if (batch != 0) {
        rig.device.publish_used();
        (void)rig.device.needs_notify();
        n += batch;
      } else {
        std::this_thread::yield();  // the machine may have fewer free cores than spinners
      }
    }
    served = n;
  });

  std::vector<DriverQueue::Used> used(kSize);
  // A behaviour test, not a timed one: on an idle machine all chains finish in well under a
  // second; on a loaded one (two spinning threads, fewer free cores) the deadline ends it and
  // whatever completed was still checked byte by byte.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(4);
  while (t.completed < kChains && !stop.load() && std::chrono::steady_clock::now() < deadline) {
    std::size_t added = 0;
    while (added < kSize && t.add_one()) ++added;
    if (added != 0) {
      rig.driver.publish();
      (void)rig.driver.needs_kick();
    }
    const std::size_t n = rig.driver.get_used_burst(used);
    for (std::size_t i = 0; i < n; ++i) t.check_used(used[i]);
    if (::testing::Test::HasFailure()) break;
    if (n == 0 && added == 0) std::this_thread::yield();
  }
  stop = true;
  device.join();
  ::testing::Test::RecordProperty("chains_completed", std::to_string(t.completed));
  EXPECT_GE(t.completed, std::min<std::uint64_t>(kChains, 500));
  EXPECT_GE(served.load(), t.completed);
  for (std::size_t e = 0; e < kChainErrorCount; ++e) EXPECT_EQ(rig.device.errors()[e], 0u);
  EXPECT_EQ(rig.driver.bad_used(), 0u);
}

class RoundTrip : public ::testing::TestWithParam<Mode> {};
class PackedRoundTrip : public ::testing::TestWithParam<Mode> {};

TEST_P(RoundTrip, SeventyThousandRandomChainsEveryByteChecked) { interleaved<Rig>(GetParam()); }
TEST_P(RoundTrip, TwoThreadsBusyPollingEveryByteChecked) { two_threads<Rig>(GetParam()); }
TEST_P(PackedRoundTrip, SeventyThousandRandomChainsEveryByteChecked) {
  interleaved<PackedRig>(GetParam());
}
TEST_P(PackedRoundTrip, TwoThreadsBusyPollingEveryByteChecked) {
  two_threads<PackedRig>(GetParam());
}

std::string mode_name(const ::testing::TestParamInfo<Mode>& info) { return info.param.name; }

INSTANTIATE_TEST_SUITE_P(Modes, RoundTrip,
                         ::testing::Values(Mode{0, 32, "plain"}, Mode{kEventIdx, 32, "event_idx"},
                                           Mode{kIndirect, 32, "indirect"},
                                           Mode{kEventIdx | kIndirect, 32, "event_idx_indirect"},
                                           Mode{kInOrder, 32, "in_order"},
                                           Mode{kInOrder | kEventIdx | kIndirect, 32,
                                                "in_order_event_idx_indirect"}),
                         mode_name);
// Packed sizes need not be powers of two: 27 wraps at an odd place.
INSTANTIATE_TEST_SUITE_P(Modes, PackedRoundTrip,
                         ::testing::Values(Mode{0, 32, "plain"}, Mode{kEventIdx, 32, "event_idx"},
                                           Mode{kIndirect, 32, "indirect"},
                                           Mode{kEventIdx | kIndirect, 27,
                                                "event_idx_indirect_size27"},
                                           Mode{kInOrder, 32, "in_order"},
                                           Mode{kInOrder | kEventIdx | kIndirect, 27,
                                                "in_order_event_idx_indirect_size27"},
                                           Mode{kInOrder | kEventIdx, 32, "in_order_event_idx"}),
                         mode_name);

}  // namespace
}  // namespace vhostkit::virtq
