#include "vhostkit/error.h"

#include <cstring>

namespace vhostkit {

std::string_view to_string(Errc code) noexcept {
  switch (code) {
    case Errc::invalid_argument: return "invalid argument";
    case Errc::out_of_range: return "out of range";
    case Errc::not_mapped: return "not mapped";
    case Errc::overlap: return "overlap";
    case Errc::too_many: return "too many";
    case Errc::bad_state: return "bad state";
    case Errc::broken: return "broken";
    case Errc::unsupported: return "unsupported";
    case Errc::system: return "system error";
    case Errc::disconnected: return "disconnected";
    case Errc::would_block: return "would block";
  }
  return "unknown error";
}

std::string Error::message() const {
  std::string m(to_string(code));
  if (!detail.empty()) {
    m += ": ";
    m += detail;
  }
  if (sys_errno != 0) {
    m += " (";
    m += std::strerror(sys_errno);
    m += ")";
  }
  return m;
}

}  // namespace vhostkit
