// What every driver here keeps per ring on top of the protocol side's FrontendRing: fixed-size
// buffers carved out of the ring's area of the shared memory, the stack of those the driver
// holds (not on the ring), and scratch for reclaiming used entries. A buffer's index is the
// token its chain is added with, so a used entry names its buffer.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "vhostkit/vhost_user/frontend_session.h"
#include "vhostkit/virtq/split_queue.h"

namespace vhostkit::driver {

struct RingBuffers {
  vhost_user::FrontendRing* ring = nullptr;
  std::uint8_t* buffers = nullptr;  // host address of buffer 0
  std::uint64_t buffers_gpa = 0;
  std::uint32_t buffer_size = 0;
  // Bytes left unused at the front of each buffer before what the ring is given (data(),
  // data_gpa()): a net driver's rx buffers start the frame on a cache line, as DPDK's mbufs do.
  std::uint32_t headroom = 0;
  std::uint16_t buffer_count = 0;
  std::vector<std::uint16_t> free;  // a stack: free[0..free_top)
  std::uint16_t free_top = 0;
  std::vector<virtq::DriverQueue::Used> used;  // scratch for get_used_burst

  // `count` buffers of `size` bytes at the start of r's area (the driver sized the area for
  // them), none of them free yet; `burst` used entries reclaimed per step.
  void init(vhost_user::FrontendRing& r, std::uint32_t size, std::uint16_t count,
            std::size_t burst) {
    ring = &r;
    buffers = r.area;
    buffers_gpa = r.area_gpa;
    buffer_size = size;
    buffer_count = count;
    free.assign(count, 0);
    free_top = 0;
    used.resize(std::min<std::size_t>(burst, r.size()));
  }

  std::uint8_t* buffer(std::uint16_t i) const noexcept {
    return buffers + std::size_t{i} * buffer_size;
  }
  std::uint64_t buffer_gpa(std::uint16_t i) const noexcept {
    return buffers_gpa + std::uint64_t{i} * buffer_size;
  }
  // Where buffer i's part on the ring starts (past the headroom), and its length.
  std::uint8_t* data(std::uint16_t i) const noexcept { return buffer(i) + headroom; }
  std::uint64_t data_gpa(std::uint16_t i) const noexcept { return buffer_gpa(i) + headroom; }
  std::uint32_t data_size() const noexcept { return buffer_size - headroom; }
  // Buffers on the ring (or otherwise not on the free stack).
  std::uint16_t in_use() const noexcept {
    return static_cast<std::uint16_t>(buffer_count - free_top);
  }
};

}  // namespace vhostkit::driver
