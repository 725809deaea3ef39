// The public C++ API of convcore.
#pragma once
#include "convcore/errors.h"
#include "convcore/net.h"
#include "convcore/ops.h"
#include "convcore/padding.h"
#include "convcore/safetensors.h"
#include "convcore/shapes.h"
#include "convcore/tensor.h"
#include "convcore/threading.h"
