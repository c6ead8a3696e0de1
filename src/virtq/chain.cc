// Names of the chain errors both ring layouts count.
#include "vhostkit/virtq/chain.h"

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

}  // namespace vhostkit::virtq
