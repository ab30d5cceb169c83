variable "chart_version" {
  description = "Version of NVIDIA's nvidia-device-plugin Helm chart (https://github.com/NVIDIA/k8s-device-plugin)."
  type        = string
  default     = "0.17.1"

  validation {
    condition     = can(regex("^[0-9]+\\.[0-9]+\\.[0-9]+$", var.chart_version))
    error_message = "chart_version must be an exact version (x.y.z), never a range."
  }
}

variable "namespace" {
  description = "Namespace of the device plugin DaemonSet."
  type        = string
  default     = "kube-system"
}

variable "node_selector" {
  description = "Labels of the nodes the plugin runs on: the GPU node group's."
  type        = map(string)
  default     = { "visionloop.dev/node-pool" = "gpu" }
}

variable "tolerations" {
  description = "Tolerations of the plugin pods: the GPU node group's taint."
  type = list(object({
    key      = string
    operator = string
    value    = optional(string)
    effect   = string
  }))
  default = [{ key = "nvidia.com/gpu", operator = "Exists", effect = "NoSchedule" }]
}
