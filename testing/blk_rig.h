// Test rig for the blk device tests: a guest driver (virtq::DriverQueue per request queue) on
// memfd memory that a vhost::Device maps through set_mem_table, as a vhost-user frontend would,
// with real kick/call eventfds (vhost::testing::GuestRings); and a temporary image file.
//
// Each queue owns ring_size request slots of kSlot bytes: header at +0, status at +kStatusOff,
// data from +kDataOff. The slot index is the chain's token.
#pragma once

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "testing/guest_rig.h"
#include "vhostkit/blk/blk_device.h"
#include "vhostkit/vhost/device.h"
#include "vhostkit/virtio/blk.h"
#include "vhostkit/virtio/features.h"
#include "vhostkit/virtq/split_queue.h"

namespace vhostkit::blk::testing {

using Bytes = std::vector<std::uint8_t>;
using Buffer = virtq::DriverQueue::Buffer;
namespace bf = virtio::blk_feature;
using virtio::bit;

inline constexpr std::uint64_t kFeatures =
    bit(virtio::feature::version_1) | bit(virtio::feature::ring_event_idx) | bit(bf::seg_max) |
    bit(bf::blk_size) | bit(bf::flush) | bit(bf::mq) | bit(bf::discard) | bit(bf::write_zeroes);

using vhost::testing::dup_fd;
using vhost::testing::make_eventfd;
using vhost::testing::wait_fd;

// A temporary image of `bytes` bytes filled with a known pattern. The file is unlinked as soon
// as it is written and named by path() as /proc/self/fd/N, so a test killed half-way (a timeout,
// ^C) leaves nothing behind in `dir`; the name works for any open in this process only.
class TempImage {
 public:
  explicit TempImage(std::size_t bytes, const char* dir = "/tmp") {
    std::string name = std::string(dir) + "/vhostkit-blk-test-XXXXXX";
    fd_ = UniqueFd(::mkostemp(name.data(), O_CLOEXEC));
    EXPECT_TRUE(fd_.valid()) << name;
    ::unlink(name.c_str());
    path_ = "/proc/self/fd/" + std::to_string(fd_.get());
    Bytes init(bytes);
    for (std::size_t i = 0; i < bytes; ++i) init[i] = static_cast<std::uint8_t>(i * 7 + i / 512);
    EXPECT_EQ(::pwrite(fd_.get(), init.data(), init.size(), 0), static_cast<ssize_t>(bytes));
  }
  const std::string& path() const { return path_; }
  Bytes read(std::uint64_t off, std::size_t len) const {
    Bytes b(len);
    EXPECT_EQ(::pread(fd_.get(), b.data(), len, static_cast<off_t>(off)),
              static_cast<ssize_t>(len));
    return b;
  }

 private:
  UniqueFd fd_;
  std::string path_;
};

// The guest: memfd memory, one DriverQueue per request queue (vhost::testing::GuestRings), and
// the request slots.
class BlkGuest : public vhost::testing::GuestRings {
 public:
  static constexpr std::uint64_t kDataGpa = 0x400000;
  static constexpr std::size_t kSlot = 0x40000;  // 256 KiB per request slot
  static constexpr std::size_t kStatusOff = 64;
  static constexpr std::size_t kDataOff = 4096;

  BlkGuest(std::uint16_t queues, std::uint64_t features = kFeatures, std::uint16_t ring_size = 128)
      : GuestRings("blk-test", kDataGpa + std::size_t{queues} * ring_size * kSlot, queues,
                   ring_size, features) {
    free_.resize(queues);
    for (std::uint16_t q = 0; q < queues; ++q) {
      for (std::uint16_t s = 0; s < ring_size; ++s) free_[q].push_back(ring_size - 1 - s);
    }
  }

  std::uint64_t slot_gpa(std::uint16_t q, std::uint16_t slot) const {
    return kDataGpa + (std::uint64_t{q} * ring_size() + slot) * kSlot;
  }
  std::uint8_t* slot_host(std::uint16_t q, std::uint16_t slot) { return host(slot_gpa(q, slot)); }
  std::size_t free_slots(std::uint16_t q) const { return free_[q].size(); }

  // Takes a slot for a hand-built chain (the caller lays out its buffers in it).
  std::optional<std::uint16_t> take_slot(std::uint16_t q) {
    if (free_[q].empty()) return std::nullopt;
    const std::uint16_t s = free_[q].back();
    free_[q].pop_back();
    std::memset(slot_host(q, s), 0, kDataOff);
    slot_host(q, s)[kStatusOff] = 0xee;  // "not written"
    return s;
  }
  bool add_raw(std::uint16_t q, std::uint16_t slot, std::span<const Buffer> out,
               std::span<const Buffer> in) {
    return driver(q).add(out, in, slot).has_value();
  }

  void write_hdr(std::uint16_t q, std::uint16_t slot, std::uint32_t type, std::uint64_t sector) {
    virtio::VirtioBlkOutHdr h{type, 0, sector};
    std::memcpy(slot_host(q, slot), &h, sizeof h);
  }

  // A well-formed request: header, data split into `pieces` buffers, status. For IN and GET_ID
  // the data is writable (in_len bytes), for OUT/DISCARD/WRITE_ZEROES readable (`out` bytes).
  std::optional<std::uint16_t> request(std::uint16_t q, std::uint32_t type, std::uint64_t sector,
                                       const Bytes& out, std::uint32_t in_len = 0,
                                       unsigned pieces = 1, std::size_t data_shift = 0) {
    auto slot = take_slot(q);
    if (!slot) return std::nullopt;
    write_hdr(q, *slot, type, sector);
    const std::uint64_t base = slot_gpa(q, *slot);
    const std::uint64_t data = base + kDataOff + data_shift;
    std::vector<Buffer> outs{{base, 16}}, ins;
    auto split = [&](std::vector<Buffer>& v, std::uint64_t len) {
      std::uint64_t off = 0;
      for (unsigned i = 0; i < pieces && off < len; ++i) {
        std::uint64_t n =
            i + 1 == pieces ? len - off : std::max<std::uint64_t>(len / pieces / 512 * 512, 512);
        n = std::min(n, len - off);
        v.push_back({data + off, static_cast<std::uint32_t>(n)});
        off += n;
      }
    };
    if (!out.empty()) {
      std::memcpy(host(data), out.data(), out.size());
      split(outs, out.size());
    }
    if (in_len != 0) {
      std::memset(host(data), 0xa5, in_len);
      split(ins, in_len);
    }
    ins.push_back({base + kStatusOff, 1});
    EXPECT_LE(kDataOff + data_shift + std::max<std::size_t>(out.size(), in_len), kSlot);
    if (!add_raw(q, *slot, outs, ins)) {
      free_[q].push_back(*slot);
      return std::nullopt;
    }
    return slot;
  }

  std::uint8_t status(std::uint16_t q, std::uint16_t slot) {
    return slot_host(q, slot)[kStatusOff];
  }
  Bytes data(std::uint16_t q, std::uint16_t slot, std::size_t len, std::size_t shift = 0) {
    const std::uint8_t* p = slot_host(q, slot) + kDataOff + shift;
    return Bytes(p, p + len);
  }

  // Reclaims used entries of queue q (token -> used len); slots are freed.
  std::map<std::uint16_t, std::uint32_t> reclaim(std::uint16_t q) {
    std::map<std::uint16_t, std::uint32_t> out;
    while (auto u = driver(q).get_used()) {
      out[static_cast<std::uint16_t>(u->token)] = u->len;
      free_[q].push_back(static_cast<std::uint16_t>(u->token));
    }
    return out;
  }

  // Kicks and waits until `n` used entries came back (or the timeout).
  std::map<std::uint16_t, std::uint32_t> complete(std::uint16_t q, std::size_t n,
                                                  int timeout_ms = 20000) {
    kick(q);
    std::map<std::uint16_t, std::uint32_t> got;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    while (got.size() < n && std::chrono::steady_clock::now() < deadline) {
      for (auto& [k, v] : reclaim(q)) got[k] = v;
      if (got.size() < n) wait_call(q, 5);
    }
    return got;
  }

  // One request, waited for: returns {status, used len}.
  std::pair<std::uint8_t, std::uint32_t> run(std::uint16_t q, std::uint16_t slot) {
    auto got = complete(q, 1);
    EXPECT_EQ(got.size(), 1u);
    EXPECT_TRUE(got.count(slot));
    return {status(q, slot), got.count(slot) ? got[slot] : 0xffffffffu};
  }

 private:
  std::vector<std::vector<std::uint16_t>> free_;
};

inline vhost::DeviceOptions dev_opts(vhost::PollMode mode = vhost::PollMode::event) {
  vhost::DeviceOptions o;
  o.name = "blk-test";
  o.mode = mode;
  o.adaptive_spin_us = 200;
  return o;
}

inline std::unique_ptr<BlkDevice> open_device(const std::string& path, bool ro = false,
                                              std::uint16_t queues = 1, bool direct = true,
                                              IoPath io = IoPath::automatic,
                                              std::chrono::microseconds latency = {}) {
  BlkOptions o;
  o.io = io;
  o.added_latency = latency;
  o.image = path;
  o.read_only = ro;
  o.num_queues = queues;
  o.try_direct = direct;
  auto d = BlkDevice::open(o);
  EXPECT_TRUE(d.has_value()) << (d ? "" : d.error().message());
  return d ? std::move(*d) : nullptr;
}

inline Bytes pattern(std::size_t len, std::uint32_t seed) {
  Bytes b(len);
  std::mt19937 rng(seed);
  for (auto& x : b) x = static_cast<std::uint8_t>(rng());
  return b;
}

}  // namespace vhostkit::blk::testing
