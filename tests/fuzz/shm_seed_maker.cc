// Writes the seed corpus of shm_segment_fuzzer: for each snapshot image given
// (the golden files), the bytes of a real segment holding it, in three
// states a recovering reader meets: one image published, two (both slots
// used, the second active), and the second publish interrupted (its slot
// still marked mid-write).
//
// Usage: shm_seed_maker <out-dir> <image-file>...
#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "persistence/shm_store.h"

namespace {

using jobengine::persist::ShmStore;

std::vector<unsigned char> slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<unsigned char>((std::istreambuf_iterator<char>(in)),
                                    std::istreambuf_iterator<char>());
}

bool spit(const std::string& path, const std::vector<unsigned char>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  return static_cast<bool>(out);
}

std::string base_name(const std::string& path) {
  const auto slash = path.rfind('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s <out-dir> <image-file>...\n", argv[0]);
    return 2;
  }
  const std::string out = argv[1];
  const std::string name = "jobengine-seed-" + std::to_string(::getpid());
  for (int i = 2; i < argc; ++i) {
    const std::vector<unsigned char> image = slurp(argv[i]);
    if (image.empty()) {
      std::fprintf(stderr, "cannot read %s\n", argv[i]);
      return 1;
    }
    (void)ShmStore::remove(name);
    auto store = ShmStore::open_or_create(name, 0);
    if (!store.ok()) {
      std::fprintf(stderr, "%s\n", store.status().to_string().c_str());
      return 1;
    }
    const std::string stem = out + "/" + base_name(argv[i]);
    if (!(*store)->publish(1, image).ok() || !spit(stem + ".one", slurp("/dev/shm/" + name))) return 1;
    if (!(*store)->publish(2, image).ok() || !spit(stem + ".two", slurp("/dev/shm/" + name))) return 1;
    // The interrupted third publish: the inactive slot's version made odd,
    // as a writer killed inside publish() leaves it (slot descriptors at 128
    // and 192, version first; slot 1 is active after two publishes, so slot
    // 0 is the one being rewritten).
    std::vector<unsigned char> torn = slurp("/dev/shm/" + name);
    if (torn.size() > 128) torn[128] |= 1;
    if (!spit(stem + ".torn", torn)) return 1;
    store->reset();
    (void)ShmStore::remove(name);
  }
  return 0;
}
