variable "name_prefix" {
  description = "Prefix of the IAM role names (the cluster name)."
  type        = string
}

variable "oidc_provider_arn" {
  description = "ARN of the cluster's IAM OIDC provider."
  type        = string
}

variable "oidc_issuer" {
  description = "The cluster's OIDC issuer without https:// (oidc.eks.<region>.amazonaws.com/id/<ID>)."
  type        = string

  validation {
    condition     = !startswith(var.oidc_issuer, "https://")
    error_message = "oidc_issuer must not start with https:// (it is the prefix of the trust policy's condition keys)."
  }
}

variable "bucket_name" {
  description = "Name of the S3 bucket for MLflow artifacts, retrain datasets and kept prediction images."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.bucket_name))
    error_message = "bucket_name must be a valid S3 bucket name (3-63 lowercase letters, digits, dots, hyphens)."
  }
}

variable "bucket_force_destroy" {
  description = "Let terraform destroy delete the bucket with its objects (every MLflow model in it)."
  type        = bool
  default     = false
}

variable "noncurrent_version_days" {
  description = "Days a replaced or deleted object version is kept (versioning guards against a bad overwrite)."
  type        = number
  default     = 30
}

variable "service_accounts" {
  description = <<-EOT
    One IAM role per Kubernetes service account (the key), assumable only by that service account in
    that namespace, named <name_prefix>-<key without a leading "visionloop-">. read and write are key prefixes of the bucket ("mlflow/"): read allows listing and
    getting objects under them, write also putting and deleting.
  EOT
  type = map(object({
    namespace = optional(string, "visionloop")
    read      = optional(list(string), [])
    write     = optional(list(string), [])
  }))

  validation {
    condition = alltrue(flatten([
      for sa in values(var.service_accounts) : [for p in concat(sa.read, sa.write) : endswith(p, "/") && !startswith(p, "/")]
    ]))
    error_message = "Every prefix must end with / and not start with / (e.g. \"mlflow/\")."
  }
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}
