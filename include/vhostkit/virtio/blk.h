// virtio-blk wire structures (virtio 1.2, 5.2).
#pragma once

#include <cstddef>
#include <cstdint>

namespace vhostkit::virtio {

inline constexpr std::uint32_t kBlkSectorSize = 512;

namespace blk_type {
inline constexpr std::uint32_t in = 0;
inline constexpr std::uint32_t out = 1;
inline constexpr std::uint32_t flush = 4;
inline constexpr std::uint32_t get_id = 8;
inline constexpr std::uint32_t get_lifetime = 10;
inline constexpr std::uint32_t discard = 11;
inline constexpr std::uint32_t write_zeroes = 13;
inline constexpr std::uint32_t secure_erase = 14;
}  // namespace blk_type

inline constexpr std::uint8_t kBlkSOk = 0;
inline constexpr std::uint8_t kBlkSIoErr = 1;
inline constexpr std::uint8_t kBlkSUnsupp = 2;

inline constexpr std::size_t kBlkIdBytes = 20;

// The request header the driver puts first in every chain.
struct VirtioBlkOutHdr {
  std::uint32_t type;
  std::uint32_t reserved;
  std::uint64_t sector;
};
static_assert(sizeof(VirtioBlkOutHdr) == 16);

// DISCARD / WRITE_ZEROES payload, one or more of these.
inline constexpr std::uint32_t kBlkWriteZeroesFUnmap = 1;
struct VirtioBlkDiscardWriteZeroes {
  std::uint64_t sector;
  std::uint32_t num_sectors;
  std::uint32_t flags;
};
static_assert(sizeof(VirtioBlkDiscardWriteZeroes) == 16);

#pragma pack(push, 1)
struct VirtioBlkConfig {
  std::uint64_t capacity;  // in 512-byte sectors
  std::uint32_t size_max;
  std::uint32_t seg_max;
  struct {
    std::uint16_t cylinders;
    std::uint8_t heads;
    std::uint8_t sectors;
  } geometry;
  std::uint32_t blk_size;
  struct {
    std::uint8_t physical_block_exp;
    std::uint8_t alignment_offset;
    std::uint16_t min_io_size;
    std::uint32_t opt_io_size;
  } topology;
  std::uint8_t writeback;
  std::uint8_t unused0;
  std::uint16_t num_queues;
  std::uint32_t max_discard_sectors;
  std::uint32_t max_discard_seg;
  std::uint32_t discard_sector_alignment;
  std::uint32_t max_write_zeroes_sectors;
  std::uint32_t max_write_zeroes_seg;
  std::uint8_t write_zeroes_may_unmap;
  std::uint8_t unused1[3];
  std::uint32_t max_secure_erase_sectors;
  std::uint32_t max_secure_erase_seg;
  std::uint32_t secure_erase_sector_alignment;
};
#pragma pack(pop)
static_assert(sizeof(VirtioBlkConfig) == 72);
static_assert(offsetof(VirtioBlkConfig, blk_size) == 20);
static_assert(offsetof(VirtioBlkConfig, writeback) == 32);
static_assert(offsetof(VirtioBlkConfig, num_queues) == 34);
static_assert(offsetof(VirtioBlkConfig, max_discard_sectors) == 36);
static_assert(offsetof(VirtioBlkConfig, write_zeroes_may_unmap) == 56);
static_assert(offsetof(VirtioBlkConfig, max_secure_erase_sectors) == 60);

}  // namespace vhostkit::virtio
