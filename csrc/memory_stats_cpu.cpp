// Live and peak bytes of CPU tensor memory: the CPU counterpart of
// torch.cuda.memory_allocated / max_memory_allocated, which torch lacks.
//
// cpu_memory_track() puts a counting allocator in front of torch's CPU
// allocator. It counts every allocation made after that point (tensor storage
// and oneDNN scratch, which also goes through the c10 allocator) and nothing
// else: no library code pages, Python objects or freed-but-retained malloc
// arenas, which is what makes RSS a poor measure of a phase. The count is a
// function of the allocation sequence alone, so two runs agree.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <atomic>
#include <mutex>
#include <tuple>
#include <unordered_map>

namespace pydefend {
namespace {

class CountingCPUAllocator final : public c10::Allocator {
 public:
  explicit CountingCPUAllocator(c10::Allocator* inner) : inner_(inner), inner_delete_(inner->raw_deleter()) {}

  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr data = inner_->allocate(n);
    void* ptr = data.get();
    if (ptr == nullptr) return data;
    // The inner allocator's context is its pointer (it has a raw deleter), so
    // the pointer alone frees it and the wrapper stays a "simple" DataPtr.
    void* context = data.release_context();
    {
      std::lock_guard<std::mutex> lock(mutex_);
      sizes_[context] = n;
    }
    add(static_cast<int64_t>(n));
    return {ptr, context, &CountingCPUAllocator::deleter, data.device()};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &CountingCPUAllocator::deleter; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  std::tuple<int64_t, int64_t> stats(bool reset_peak) {
    int64_t current = current_.load();
    int64_t peak = peak_.load();
    if (reset_peak) peak_.store(current);
    return {current, peak};
  }

  static CountingCPUAllocator* instance;

 private:
  static void deleter(void* context) {
    CountingCPUAllocator* self = instance;
    size_t n = 0;
    {
      std::lock_guard<std::mutex> lock(self->mutex_);
      auto it = self->sizes_.find(context);
      if (it != self->sizes_.end()) {
        n = it->second;
        self->sizes_.erase(it);
      }
    }
    self->add(-static_cast<int64_t>(n));
    self->inner_delete_(context);
  }

  void add(int64_t delta) {
    int64_t now = current_.fetch_add(delta) + delta;
    int64_t peak = peak_.load();
    while (now > peak && !peak_.compare_exchange_weak(peak, now)) {
    }
  }

  c10::Allocator* inner_;
  c10::DeleterFnPtr inner_delete_;
  std::mutex mutex_;
  std::unordered_map<void*, size_t> sizes_;
  std::atomic<int64_t> current_{0};
  std::atomic<int64_t> peak_{0};
};

CountingCPUAllocator* CountingCPUAllocator::instance = nullptr;

// Installs the counter once; false when torch's CPU allocator cannot be
// wrapped (an allocator without a raw deleter, e.g. a custom one).
bool cpu_memory_track() {
  static std::mutex install_mutex;
  std::lock_guard<std::mutex> lock(install_mutex);
  if (CountingCPUAllocator::instance != nullptr) return true;
  c10::Allocator* inner = c10::GetCPUAllocator();
  if (inner->raw_deleter() == nullptr) return false;
  // Lives as long as the process: storages keep a pointer to their allocator.
  CountingCPUAllocator::instance = new CountingCPUAllocator(inner);
  c10::SetCPUAllocator(CountingCPUAllocator::instance, /*priority=*/255);
  return true;
}

// (live bytes, peak live bytes since the last reset); reset_peak sets the
// peak to the live bytes. Both are 0 until cpu_memory_track() succeeds.
std::tuple<int64_t, int64_t> cpu_memory_stats(bool reset_peak) {
  if (CountingCPUAllocator::instance == nullptr) return {0, 0};
  return CountingCPUAllocator::instance->stats(reset_peak);
}

}  // namespace
}  // namespace pydefend

TORCH_LIBRARY_FRAGMENT(pydefend_native, m) {
  m.def("cpu_memory_track() -> bool", &pydefend::cpu_memory_track);
  m.def("cpu_memory_stats(bool reset_peak) -> (int current, int peak)", &pydefend::cpu_memory_stats);
}
