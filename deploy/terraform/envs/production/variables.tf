variable "region" {
  description = "AWS region of everything (pick one with the GPU instance types you want, e.g. g5 in us-west-2)."
  type        = string
  default     = "us-west-2"

  validation {
    condition     = can(regex("^[a-z]{2}(-gov)?-[a-z]+-[0-9]$", var.region))
    error_message = "region must be an AWS region name such as us-west-2."
  }
}

variable "environment" {
  description = "Environment name, put in the tags."
  type        = string
  default     = "production"
}

variable "cluster_name" {
  description = "Name of the EKS cluster; also the prefix of the VPC, IAM roles and the default bucket name."
  type        = string
  default     = "visionloop"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,30}$", var.cluster_name))
    error_message = "cluster_name must be 2-31 lowercase letters, digits or hyphens, starting with a letter."
  }
}

variable "kubernetes_version" {
  description = "Kubernetes minor version of the cluster and its node groups."
  type        = string
  default     = "1.32"

  validation {
    condition     = can(regex("^1\\.[0-9]{2}$", var.kubernetes_version))
    error_message = "kubernetes_version must look like 1.32."
  }
}

variable "namespace" {
  description = "Kubernetes namespace of the visionloop workloads (deploy/k8s); the IRSA trust policies name it."
  type        = string
  default     = "visionloop"
}

variable "vpc_cidr" {
  description = "IPv4 CIDR of the VPC (/16 to /20)."
  type        = string
  default     = "10.0.0.0/16"

  validation {
    condition     = can(cidrhost(var.vpc_cidr, 0))
    error_message = "vpc_cidr must be an IPv4 CIDR block."
  }
}

variable "az_count" {
  description = "Availability zones the subnets and nodes are spread over (2 to 4)."
  type        = number
  default     = 3

  validation {
    condition     = var.az_count >= 2 && var.az_count <= 4
    error_message = "az_count must be between 2 and 4."
  }
}

variable "single_nat_gateway" {
  description = "One NAT gateway for all zones (cheaper) instead of one per zone."
  type        = bool
  default     = true
}

variable "api_public_access_cidrs" {
  description = "CIDRs that may reach the cluster's public API endpoint (narrow it to your office/VPN and CI runners)."
  type        = list(string)
  default     = ["0.0.0.0/0"]

  validation {
    condition     = alltrue([for c in var.api_public_access_cidrs : can(cidrhost(c, 0))])
    error_message = "api_public_access_cidrs must be CIDR blocks."
  }
}

variable "admin_principal_arns" {
  description = "Extra IAM role/user ARNs given cluster-admin through access entries (the identity running terraform has it already)."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for a in var.admin_principal_arns : can(regex("^arn:aws[a-z-]*:iam::[0-9]{12}:(role|user)/", a))])
    error_message = "admin_principal_arns must be IAM role or user ARNs."
  }
}

variable "cpu_instance_types" {
  description = "Instance types of the CPU node group."
  type        = list(string)
  default     = ["m6i.xlarge"]
}

variable "cpu_min_size" {
  description = "Minimum nodes of the CPU group (at least 1: CoreDNS and the services live there)."
  type        = number
  default     = 1

  validation {
    condition     = var.cpu_min_size >= 1
    error_message = "cpu_min_size must be at least 1."
  }
}

variable "cpu_desired_size" {
  description = "Nodes of the CPU group at creation (later changes are left to an autoscaler or the AWS CLI)."
  type        = number
  default     = 2
}

variable "cpu_max_size" {
  description = "Maximum nodes of the CPU group."
  type        = number
  default     = 4
}

variable "gpu_instance_types" {
  description = "Instance types of the GPU node group (g5.xlarge: 1 NVIDIA A10G; g5.12xlarge: 4, for the 4-GPU PyTorchJob)."
  type        = list(string)
  default     = ["g5.xlarge"]

  validation {
    condition     = length(var.gpu_instance_types) > 0
    error_message = "gpu_instance_types must name at least one instance type."
  }
}

variable "gpus_per_node" {
  description = "GPUs of one node of gpu_instance_types, told to Cluster Autoscaler for scale-from-zero."
  type        = number
  default     = 1

  validation {
    condition     = var.gpus_per_node >= 1
    error_message = "gpus_per_node must be at least 1."
  }
}

variable "gpu_ami_type" {
  description = "AMI of the GPU nodes: AL2023_x86_64_NVIDIA (device plugin installed by Helm) or BOTTLEROCKET_x86_64_NVIDIA (plugin built in)."
  type        = string
  default     = "AL2023_x86_64_NVIDIA"

  validation {
    condition     = contains(["AL2023_x86_64_NVIDIA", "BOTTLEROCKET_x86_64_NVIDIA"], var.gpu_ami_type)
    error_message = "gpu_ami_type must be AL2023_x86_64_NVIDIA or BOTTLEROCKET_x86_64_NVIDIA."
  }
}

variable "gpu_capacity_type" {
  description = "ON_DEMAND or SPOT for the GPU nodes."
  type        = string
  default     = "ON_DEMAND"

  validation {
    condition     = contains(["ON_DEMAND", "SPOT"], var.gpu_capacity_type)
    error_message = "gpu_capacity_type must be ON_DEMAND or SPOT."
  }
}

variable "gpu_min_size" {
  description = "Minimum nodes of the GPU group; 0 lets it cost nothing while no training runs."
  type        = number
  default     = 0

  validation {
    condition     = var.gpu_min_size >= 0
    error_message = "gpu_min_size must not be negative."
  }
}

variable "gpu_desired_size" {
  description = "Nodes of the GPU group at creation (scale it up for a training run, see README)."
  type        = number
  default     = 0
}

variable "gpu_max_size" {
  description = "Maximum nodes of the GPU group (caps the GPU bill)."
  type        = number
  default     = 2

  validation {
    condition     = var.gpu_max_size >= 1
    error_message = "gpu_max_size must be at least 1."
  }
}

variable "gpu_disk_size" {
  description = "Root volume of a GPU node in GiB (the CUDA training image is several GB)."
  type        = number
  default     = 100

  validation {
    condition     = var.gpu_disk_size >= 50
    error_message = "gpu_disk_size must be at least 50 GiB."
  }
}

variable "nvidia_device_plugin_version" {
  description = "Exact version of the NVIDIA nvidia-device-plugin Helm chart."
  type        = string
  default     = "0.17.1"
}

variable "ecr_keep_images" {
  description = "Images each ECR repository keeps before the oldest are expired."
  type        = number
  default     = 30
}

variable "artifact_bucket_name" {
  description = "S3 bucket for MLflow artifacts, datasets and kept images; null makes CLUSTER_NAME-artifacts-ACCOUNT_ID."
  type        = string
  default     = null
}

variable "tags" {
  description = "Extra tags on every AWS resource (cost allocation, owner)."
  type        = map(string)
  default     = {}
}
