variable "cluster_name" {
  description = "Name of the EKS cluster."
  type        = string
}

variable "kubernetes_version" {
  description = "Kubernetes minor version of the control plane and the node groups, e.g. 1.32."
  type        = string

  validation {
    condition     = can(regex("^1\\.[0-9]{2}$", var.kubernetes_version))
    error_message = "kubernetes_version must look like 1.32."
  }
}

variable "vpc_id" {
  description = "VPC the cluster runs in."
  type        = string
}

variable "subnet_ids" {
  description = "Private subnets (two zones or more) for the control plane's network interfaces and the nodes."
  type        = list(string)

  validation {
    condition     = length(var.subnet_ids) >= 2
    error_message = "EKS needs subnets in at least two availability zones."
  }
}

variable "endpoint_public_access" {
  description = "Whether the API server is reachable from the internet (limited to public_access_cidrs)."
  type        = bool
  default     = true
}

variable "public_access_cidrs" {
  description = "CIDRs allowed to reach the public API endpoint."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

variable "admin_principal_arns" {
  description = "IAM roles/users given cluster-admin through EKS access entries (the identity that runs terraform gets it anyway)."
  type        = list(string)
  default     = []
}

variable "cluster_log_types" {
  description = "Control-plane logs sent to CloudWatch."
  type        = list(string)
  default     = ["api", "audit", "authenticator"]
}

variable "log_retention_days" {
  description = "Retention of the control-plane log group."
  type        = number
  default     = 30
}

variable "cpu_instance_types" {
  description = "Instance types of the CPU node group (serving, monitor, loop, MLflow, PostgreSQL, system pods)."
  type        = list(string)
  default     = ["m6i.xlarge"]
}

variable "cpu_scaling" {
  description = "min, desired and max size of the CPU node group."
  type        = object({ min = number, desired = number, max = number })
  default     = { min = 1, desired = 2, max = 4 }

  validation {
    condition     = var.cpu_scaling.min >= 1 && var.cpu_scaling.min <= var.cpu_scaling.desired && var.cpu_scaling.desired <= var.cpu_scaling.max
    error_message = "cpu_scaling needs 1 <= min <= desired <= max (CoreDNS and the services need a CPU node)."
  }
}

variable "cpu_disk_size" {
  description = "Root volume of a CPU node, GiB."
  type        = number
  default     = 50
}

variable "gpu_instance_types" {
  description = "Instance types of the GPU node group (NVIDIA GPUs)."
  type        = list(string)
  default     = ["g5.xlarge"]
}

variable "gpu_ami_type" {
  description = "EKS-optimised AMI with the NVIDIA driver and container toolkit."
  type        = string
  default     = "AL2023_x86_64_NVIDIA"

  validation {
    condition     = contains(["AL2023_x86_64_NVIDIA", "BOTTLEROCKET_x86_64_NVIDIA"], var.gpu_ami_type)
    error_message = "gpu_ami_type must be AL2023_x86_64_NVIDIA or BOTTLEROCKET_x86_64_NVIDIA."
  }
}

variable "gpu_capacity_type" {
  description = "ON_DEMAND or SPOT for the GPU nodes (training resumes from its checkpoint after a spot interruption)."
  type        = string
  default     = "ON_DEMAND"

  validation {
    condition     = contains(["ON_DEMAND", "SPOT"], var.gpu_capacity_type)
    error_message = "gpu_capacity_type must be ON_DEMAND or SPOT."
  }
}

variable "gpu_scaling" {
  description = "min, desired and max size of the GPU node group; min 0 lets it cost nothing while idle."
  type        = object({ min = number, desired = number, max = number })
  default     = { min = 0, desired = 0, max = 2 }

  validation {
    condition     = var.gpu_scaling.min >= 0 && var.gpu_scaling.min <= var.gpu_scaling.desired && var.gpu_scaling.desired <= var.gpu_scaling.max && var.gpu_scaling.max >= 1
    error_message = "gpu_scaling needs 0 <= min <= desired <= max and max >= 1."
  }
}

variable "gpu_disk_size" {
  description = "Root volume of a GPU node, GiB (the CUDA training image is several GB)."
  type        = number
  default     = 100
}

variable "gpus_per_node" {
  description = "GPUs of one instance of gpu_instance_types (g5.xlarge: 1), advertised to Cluster Autoscaler for scale-from-zero."
  type        = number
  default     = 1
}

variable "addon_versions" {
  description = "Pinned EKS add-on versions by name; an add-on left out gets the default version for the cluster's Kubernetes version."
  type        = map(string)
  default     = {}
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}
