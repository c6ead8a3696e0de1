// Test rig shared by the virtq tests: one block of process memory registered in a GuestMemory
// as three local regions (two adjacent, one after a hole), a driver queue on it and a device
// queue attached to the same ring: Rig for the split layout, PackedRig for the packed one.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <span>

#include "vhostkit/memory/guest_memory.h"
#include "vhostkit/virtio/features.h"
#include "vhostkit/virtq/packed_queue.h"
#include "vhostkit/virtq/split_queue.h"

namespace vhostkit::virtq::testing {

struct FreeDeleter {
  void operator()(void* p) const noexcept { std::free(p); }
};

// What differs between the layouts: the queue types, the ring's size in memory, the resume point
// and how the device is pointed at the driver's ring.
struct SplitLayout {
  using Driver = DriverQueue;
  using Device = DeviceQueue;
  using Base = std::uint16_t;  // last_avail_idx
  static std::size_t ring_bytes(std::uint16_t size) {
    return DriverRingLayout::for_size(size).total_bytes;
  }
  static void attach(Device& dev, const memory::GuestMemory& mem, const Driver& drv,
                     std::uint16_t size, std::uint64_t features, Base base) {
    dev.attach(&mem, SplitRing{drv.desc(), drv.avail(), drv.used(), size}, features, base);
  }
};
struct PackedLayout {
  using Driver = PackedDriverQueue;
  using Device = PackedDeviceQueue;
  using Base = PackedRingBase;
  static std::size_t ring_bytes(std::uint16_t size) {
    return PackedRingLayout::for_size(size).total_bytes;
  }
  static void attach(Device& dev, const memory::GuestMemory& mem, const Driver& drv,
                     std::uint16_t size, std::uint64_t features, Base base) {
    dev.attach(&mem, PackedRing{drv.desc(), drv.driver_event(), drv.device_event(), size}, features,
               base);
  }
};

template <class Layout>
class BasicRig {
 public:
  using Driver = typename Layout::Driver;
  using Device = typename Layout::Device;
  using Base = typename Layout::Base;

  // Guest-physical map: [kGpaA, +kRegion) and [kGpaB = kGpaA + kRegion, +kRegion) are adjacent
  // (a buffer across kGpaB spans two regions); [kGpaC, +kRegion) sits after a hole.
  static constexpr std::uint64_t kRegion = 1u << 20;
  static constexpr std::uint64_t kGpaA = 0x100000;
  static constexpr std::uint64_t kGpaB = kGpaA + kRegion;
  static constexpr std::uint64_t kGpaC = kGpaB + 2 * kRegion;
  static constexpr std::uint64_t kRingGpa = kGpaA;
  static constexpr std::uint64_t kIndirectGpa = kGpaA + 0x40000;  // 256 KiB into A
  static constexpr std::uint64_t kDataGpa = kGpaA + 0x80000;      // data from here on
  static constexpr std::uint16_t kMaxIndirect = 16;

  explicit BasicRig(std::uint16_t size, std::uint64_t features = 0) : size_(size) {
    block_.reset(static_cast<std::uint8_t*>(std::aligned_alloc(4096, 3 * kRegion)));
    std::memset(block_.get(), 0, 3 * kRegion);
    add(kGpaA, 0);
    add(kGpaB, kRegion);
    add(kGpaC, 2 * kRegion);
    reinit(features);
  }

  void reinit(std::uint64_t features, Base base = {}) {
    features_ = features;
    std::span<std::byte> indirect;
    if (features & virtio::bit(virtio::feature::ring_indirect_desc)) {
      indirect = std::span<std::byte>(reinterpret_cast<std::byte*>(host(kIndirectGpa)),
                                      std::size_t{size_} * kMaxIndirect * 16);
    }
    auto r = driver.init(std::span<std::byte>(reinterpret_cast<std::byte*>(host(kRingGpa)),
                                              Layout::ring_bytes(size_)),
                         kRingGpa, size_, features, indirect, kIndirectGpa, kMaxIndirect);
    ASSERT_TRUE(r.has_value()) << r.error().message();
    attach_device(base);
  }

  void attach_device(Base base = {}) {
    Layout::attach(device, mem, driver, size_, features_, base);
  }

  // Host pointer of a gpa in the block (test-side only; the code under test translates).
  std::uint8_t* host(std::uint64_t gpa) {
    if (gpa >= kGpaC) return block_.get() + 2 * kRegion + (gpa - kGpaC);
    return block_.get() + (gpa - kGpaA);
  }

  // Adds a one-buffer-each-way chain and publishes it.
  std::uint16_t add_publish(std::span<const DriverQueue::Buffer> out,
                            std::span<const DriverQueue::Buffer> in, std::uint64_t token = 0) {
    auto h = driver.add(out, in, token);
    EXPECT_TRUE(h.has_value());
    driver.publish();
    return h.value_or(0);
  }

  std::uint64_t errors(ChainError e) const { return device.errors()[static_cast<std::size_t>(e)]; }

  memory::GuestMemory mem;
  Driver driver;
  Device device;

 private:
  void add(std::uint64_t gpa, std::uint64_t off) {
    memory::RegionSpec spec{gpa, kRegion, 0x7f0000000000ull + gpa, 0};
    auto r = mem.add_local_region(spec, block_.get() + off);
    ASSERT_TRUE(r.has_value()) << r.error().message();
  }

  std::uint16_t size_;
  std::uint64_t features_ = 0;
  std::unique_ptr<std::uint8_t, FreeDeleter> block_;
};

using Rig = BasicRig<SplitLayout>;
using PackedRig = BasicRig<PackedLayout>;

inline constexpr std::uint64_t kEventIdx = virtio::bit(virtio::feature::ring_event_idx);
inline constexpr std::uint64_t kIndirect = virtio::bit(virtio::feature::ring_indirect_desc);
inline constexpr std::uint64_t kInOrder = virtio::bit(virtio::feature::in_order);

}  // namespace vhostkit::virtq::testing
