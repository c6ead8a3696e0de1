// Names of the chain errors both ring layouts count.
#include "vhostkit/virtq/chain.h"

#include <cstring>

namespace vhostkit::virtq {

const char* to_string(ChainError e) noexcept {
  switch (e) {
    case ChainError::queue_broken: return "queue broken";
    case ChainError::avail_idx_runaway: return "avail idx moved more than the queue size";
    case ChainError::head_out_of_range: return "avail ring head out of range";
    case ChainError::next_out_of_range: return "descriptor next out of range";
    case ChainError::chain_too_long: return "descriptor chain longer than the queue size";
    case ChainError::desc_not_mapped: return "descriptor buffer not in guest memory";
    case ChainError::desc_len_wraps: return "descriptor addr + len wraps";
    case ChainError::total_too_large: return "chain longer than 4 GiB";
    case ChainError::indirect_not_negotiated: return "indirect descriptor not negotiated";
    case ChainError::indirect_not_mapped: return "indirect table not in guest memory";
    case ChainError::indirect_bad_len: return "indirect table length 0 or not a multiple of 16";
    case ChainError::indirect_nested: return "indirect descriptor inside an indirect table";
    case ChainError::indirect_with_next: return "descriptor with both INDIRECT and NEXT";
    case ChainError::readable_after_writable: return "readable descriptor after a writable one";
    case ChainError::too_many_segments: return "chain needs more segments than provided";
    case ChainError::chain_unterminated:
      return "packed chain runs into a descriptor not available or past the queue size";
    case ChainError::wrap_state_invalid: return "packed ring resume point or wrap state invalid";
    case ChainError::id_out_of_range: return "packed buffer id out of range";
    case ChainError::id_in_flight: return "packed buffer id reused while in flight";
    case ChainError::indirect_in_chain: return "packed indirect descriptor inside a chain";
    case ChainError::empty: return "no chain available";
    case ChainError::kCount: break;
  }
  return "unknown chain error";
}

std::expected<const std::uint8_t*, ChainError> detail::copy_spanning_table(
    const memory::GuestMemory& mem, std::uint64_t gpa, std::uint32_t len,
    std::span<std::uint8_t> buf) noexcept {
  if (len > buf.size()) return std::unexpected(ChainError::chain_too_long);
  std::array<iovec, kIndirectTablePieces> pieces{};
  auto n = mem.gpa_to_iovec(gpa, len, pieces);
  if (!n) return std::unexpected(ChainError::indirect_not_mapped);
  std::size_t at = 0;
  for (std::size_t i = 0; i < *n; ++i) {
    std::memcpy(buf.data() + at, pieces[i].iov_base, pieces[i].iov_len);
    at += pieces[i].iov_len;
  }
  return buf.data();
}

}  // namespace vhostkit::virtq
