variable "repository_names" {
  description = "ECR repositories to create, one per image."
  type        = list(string)
  default     = ["visionloop-serve", "visionloop-train"]
}

variable "image_tag_mutability" {
  description = "IMMUTABLE: a pushed tag (the package version, a git SHA) always names the same image."
  type        = string
  default     = "IMMUTABLE"

  validation {
    condition     = contains(["IMMUTABLE", "MUTABLE"], var.image_tag_mutability)
    error_message = "image_tag_mutability must be IMMUTABLE or MUTABLE."
  }
}

variable "scan_on_push" {
  description = "Run ECR's basic vulnerability scan on every pushed image."
  type        = bool
  default     = true
}

variable "keep_images" {
  description = "How many images each repository keeps; older ones are expired by the lifecycle policy."
  type        = number
  default     = 30

  validation {
    condition     = var.keep_images >= 1
    error_message = "keep_images must be at least 1."
  }
}

variable "untagged_expire_days" {
  description = "Days after which an untagged image (a tag that moved, a failed multi-arch push) is expired."
  type        = number
  default     = 7
}

variable "force_delete" {
  description = "Let terraform destroy delete a repository that still holds images."
  type        = bool
  default     = false
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}
